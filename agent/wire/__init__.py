"""What knet says on the wire: typed, versioned messages, parsed in one place.

``envelope`` (the binary activation envelope), ``topics`` (every topic name), ``control``
(the JSON control-plane messages), ``update_report`` (a device's word on an update) and
``codec`` (the activation codecs and their frame). Nothing here imports the rest of the agent
but its errors and ``safejson``: the trainer reads every message through these modules too.
"""
