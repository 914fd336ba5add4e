"""What knet says on the wire: typed, versioned messages, parsed in one place.

Envelopes (``agent.envelope``) and topics (``agent.topics``) live beside this package for
now; ``agent.wire.control`` holds the JSON control-plane messages.
"""
