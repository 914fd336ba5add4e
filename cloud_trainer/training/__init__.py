"""Training, distillation, disaggregated workers, the gate, retraining runs: new candidates."""
