"""Running a partition: its manifest and profile, onnxruntime sessions, sources, stages."""
