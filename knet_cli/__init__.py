"""The operator's command line, ``knet``: broker and device provisioning, update keys,
models and cuts, device bundles, the partition planner, the fleet view, benchmarks
(``bench/``, imported only from here) and the demo (``knet_lab``). Neither the trainer
daemon (``cloud_trainer``) nor the device side (``agent``) imports it."""
