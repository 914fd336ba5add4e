"""Mosquitto configuration, provisioning and a launcher for private brokers."""
