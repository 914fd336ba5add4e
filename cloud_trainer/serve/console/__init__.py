"""The operator's web console (issue #15), served by ``knet-trainer`` when ``[console]`` is
enabled: Fleet, Device, Models, Runs and Drift pages over the trainer's live fleet table,
registry and run log, a JSON API for ``knet fleet``, and a few authenticated actions."""
