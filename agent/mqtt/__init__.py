"""Every MQTT connection knet makes: one endpoint model and one client factory.

``agent.mqtt.endpoint`` is pydantic only (the config files embed it); ``agent.mqtt.client``
builds paho clients from it. Both the agent and the trainer connect through them, so a
setting means the same thing, with the same default, on every connection.

The device's own connection builds on them: ``link`` (Will, birth and state, reconnects,
spooled publishing) with its ``spool`` and ``netmeter``, and what decides what goes up it,
``uplink`` (which inputs) and ``batcher`` (how many per message).
"""
