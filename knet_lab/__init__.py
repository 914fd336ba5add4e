"""The lab: a whole fleet on one host as processes (provisioned broker, ``knet-trainer``,
agents, cameras), the drift-and-recover demo and what they need (camera drifts, the
fleet's first deployment). Driven by ``knet demo``, ``knet bench fleet`` and the fault
tests; not shipped in the trainer image, never imported by ``cloud_trainer``."""
