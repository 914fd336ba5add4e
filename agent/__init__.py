"""knet's device side: student blocks on onnxruntime, compressed activations over MQTT.

Nothing in this package may import torch: it runs on Raspberry Pi and Jetson images.
"""

__version__ = "0.1.0"
