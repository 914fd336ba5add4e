"""Every MQTT connection knet makes: one endpoint model and one client factory.

``agent.mqtt.endpoint`` is pydantic only (the config files embed it); ``agent.mqtt.client``
builds paho clients from it. Both the agent and the trainer connect through them, so a
setting means the same thing, with the same default, on every connection.
"""
