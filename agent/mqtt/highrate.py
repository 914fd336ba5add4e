"""A paho client for a connection that receives thousands of QoS 1 messages per second.

The trainer's ingest connection (``make_client(..., client_class=HighRateClient)``) spent
more CPU in paho than in its own validation. Profiled under ``knet bench ingest``
(docs/benchmarks.md), paho 2.2 pays per incoming PUBLISH:

* **a Properties object** built and cleared even when the packet carries none: its
  ``__init__`` builds two 27-entry tables and ``clear()`` string-replaces 27 names (about a
  third of paho's receive CPU). A PUBLISH without properties, which is what a device's
  activation is, gets a copy of one pre-built empty object instead;
* **one select() and three or four recv() calls** (the fixed header byte, the length bytes,
  the body): reads go through a read-ahead buffer, and ``loop_read`` keeps handling packets
  while the buffer holds bytes (select() cannot see them);
* **one wake-up and one send() per PUBACK**: ``ack_many`` queues a batch's PUBACKs as one
  write.

Anything else (QoS 2, a packet with properties, a topic alias, MQTT 3) takes paho's own
path, so behaviour is paho's. This leans on paho 2.x internals (``_handle_publish``,
``_in_packet``, ``_sock_recv``, ``_packet_queue``), checked at import and exercised by
``tests/test_mqtt_highrate.py`` against a real broker with the pinned paho.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.mqtt.client import KnetClient

READ_AHEAD = 1 << 16
_PUBACK = struct.Struct("!BBH")
_PUBACK_CMD = 0x40
_PAHO_HOOKS = ("_handle_publish", "_sock_recv", "_packet_queue", "_handle_on_message",
               "loop_read", "_send_puback")
_missing = [name for name in _PAHO_HOOKS if not hasattr(mqtt.Client, name)]
if _missing:  # pragma: no cover - a paho without the 2.x internals this module relies on
    raise ImportError(f"paho-mqtt {getattr(mqtt, '__version__', '?')} lacks {_missing}")

_EMPTY_PUBLISH_PROPERTIES = Properties(PacketTypes.PUBLISH)


def _empty_publish_properties() -> Properties:
    """A fresh, empty PUBLISH Properties without running its costly ``__init__``.

    The copied attributes are paho's constant lookup tables (never written to); a property
    a callback sets lands in the copy's own ``__dict__``.
    """
    props = Properties.__new__(Properties)
    props.__dict__.update(_EMPTY_PUBLISH_PROPERTIES.__dict__)
    return props


class HighRateClient(KnetClient):
    """``KnetClient`` with the receive and acknowledge fast paths of the module doc."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rbuf = b""
        self._rpos = 0
        self._rsock: Any = None  # the socket the buffered bytes came from

    # -- reads -----------------------------------------------------------------------------
    def _buffered(self) -> bool:
        return self._rpos < len(self._rbuf) and self._rsock is self._sock

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._buffered():
            start = self._rpos
            self._rpos = min(start + bufsize, len(self._rbuf))
            return self._rbuf[start:self._rpos]
        sock = self._sock
        data = super()._sock_recv(max(bufsize, READ_AHEAD))
        if len(data) <= bufsize:
            self._rbuf, self._rpos = b"", 0
            return data
        self._rbuf, self._rpos, self._rsock = data, bufsize, sock
        return data[:bufsize]

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        """paho's, then on until the read-ahead buffer is empty: select() would not wake
        for bytes already read out of the socket."""
        rc = super().loop_read(max_packets)
        while rc == MQTTErrorCode.MQTT_ERR_SUCCESS and self._sock is not None \
                and self._buffered():
            rc = super().loop_read(1)
        return rc

    # -- PUBLISH without properties --------------------------------------------------------
    def _handle_publish(self) -> MQTTErrorCode:
        header: int = self._in_packet["command"]
        packet = self._in_packet["packet"]
        qos = (header & 0x06) >> 1
        size = len(packet)
        if qos > 1 or self._protocol != mqtt.MQTTv5 or size < 3:
            return super()._handle_publish()
        topic_end = 2 + ((packet[0] << 8) | packet[1])
        pos, mid = topic_end, 0
        if qos:
            if pos + 2 > size:
                return super()._handle_publish()
            mid = (packet[pos] << 8) | packet[pos + 1]
            pos += 2
        if topic_end == 2 or pos >= size or packet[pos] != 0:  # alias, or properties
            return super()._handle_publish()
        message = mqtt.MQTTMessage(mid=mid, topic=bytes(packet[2:topic_end]))
        message.dup = bool(header & 0x08)
        message.qos = qos
        message.retain = bool(header & 0x01)
        message.properties = _empty_publish_properties()
        message.payload = bytes(memoryview(packet)[pos + 1:])  # one copy, not two
        message.timestamp = mqtt.time_func()
        self._easy_log(mqtt.MQTT_LOG_DEBUG, "Received PUBLISH (d%d, q%d, r%d, m%d), ...  "
                       "(%d bytes)", message.dup, qos, message.retain, mid, len(message.payload))
        self._handle_on_message(message)
        if qos == 1 and not self._manual_ack:
            return self._send_puback(mid)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    # -- acknowledgements ------------------------------------------------------------------
    def ack_many(self, mids: Iterable[int]) -> MQTTErrorCode:
        """PUBACK these QoS 1 messages (``manual_ack``), in this order, as one queued write."""
        data = b"".join([_PUBACK.pack(_PUBACK_CMD, 2, mid) for mid in mids])
        if not data:
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        return self._packet_queue(_PUBACK_CMD, data, 0, 1)


__all__ = ["READ_AHEAD", "HighRateClient"]
