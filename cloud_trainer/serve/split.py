"""Split inference: a device runs student blocks 1..k, the cloud finishes with teacher k+1..N.

Requests arrive on ``knet/v1/{fleet}/{device}/infer`` as activation envelopes (boundary k);
the reply goes to ``knet/v1/{fleet}/{device}/reply`` with the request's ``CorrelationData``,
as JSON ``{"prediction", "confidence", "boundary", "model_version"}`` or ``{"error": ...}`` —
a request that cannot be served gets an error reply, never silence. A bounded worker pool
keeps a burst of requests from growing memory: when it is full, new requests are answered
``busy`` at once.

The reply topic is derived from the request topic, i.e. from the identity the broker's ACL
authenticated (only device ``d`` may publish ``.../d/infer``). The MQTT v5 ``ResponseTopic``
of the request is never used as a destination: a device that named another device's topic,
the manifest or a trainer topic there would make this server (which may write every
device's ``reply``) publish on its behalf — a confused deputy. A ``ResponseTopic`` other
than the device's own reply topic is counted (``foreign_response_topic``) and answered on
the device's own topic. ``CorrelationData`` is echoed only to that topic, up to
``MAX_CORRELATION_BYTES``; a longer one gets an error reply without it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import torch
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.mqtt.client import SubscribeError, make_client
from agent.mqtt.endpoint import MqttEndpoint
from agent.wire.codec import CodecError, decode
from agent.wire.envelope import Envelope, EnvelopeError
from agent.wire.topics import TopicError, TopicKind, Topics
from cloud_trainer.guard import RateLimitedLog
from cloud_trainer.models.blocks import BlockModel

log = logging.getLogger(__name__)

MAX_CORRELATION_BYTES = 64  # the agent sends an 8-byte sequence number


class SplitServer:
    """Serves teacher blocks k+1..N for every device of a fleet."""

    def __init__(self, teacher: BlockModel, model_id: str, topics: Topics,
                 endpoint: MqttEndpoint, *, workers: int = 2, max_pending: int = 64,
                 max_payload: int = 16 * 2**20,
                 share_group: str | None = None) -> None:
        self.teacher = teacher.eval()
        self.model_id = model_id
        self.topics = topics
        self.max_payload = max_payload
        # Replicas: one $share group, so each request is answered once, by any of them.
        self.share_group = share_group
        self.stats = {"requests": 0, "replies": 0, "errors": 0, "busy": 0, "bad_topic": 0,
                      "foreign_response_topic": 0, "internal": 0}
        self._bad_log = RateLimitedLog(log, 10.0)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="knet-split")
        self._slots = threading.BoundedSemaphore(max_pending)
        infer = topics.all_devices(TopicKind.INFER.value)
        self._filter = topics.shared(share_group, infer) if share_group else infer
        self._client = make_client(endpoint, default_client_id="knet-split")
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message

    def start(self) -> SplitServer:
        """Connect in the background (``wait_ready`` blocks until requests reach us)."""
        self._client.start()
        return self

    def stop(self) -> None:
        """Finish the requests being computed, then disconnect."""
        self._pool.shutdown(wait=True)
        self._client.stop()

    def __enter__(self) -> SplitServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def wait_ready(self, timeout: float) -> bool:
        """True once connected and the broker granted the ``infer`` subscription."""
        deadline = time.monotonic() + timeout
        if not self._client.wait_connected(timeout):
            return False
        try:
            self._client.wait_subscribed([self._filter], max(0.0, deadline - time.monotonic()))
        except SubscribeError as exc:
            log.error("split server not subscribed: %s", exc)
            return False
        return True

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any,
                    _p: Any = None) -> None:
        if reason.is_failure:
            log.error("split server connection refused: %s", reason)
            return
        client.subscribe(self._filter, qos=1)

    def reply_topic(self, request_topic: str) -> str:
        """Where a request on ``request_topic`` is answered: its device's own reply topic."""
        topic = self.topics.parse(request_topic)
        if topic.kind is not TopicKind.INFER or topic.device is None:
            raise TopicError(f"{request_topic!r} is not an infer topic")
        return self.topics.reply(topic.device)

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            self._handle(msg)
        except Exception as exc:  # never end paho's network thread on one request
            self.stats["internal"] += 1
            self._bad_log.log(logging.ERROR, ("internal", type(exc).__name__),
                              "infer request on %r dropped: %r", msg.topic, exc, exc_info=True)

    def _handle(self, msg: mqtt.MQTTMessage) -> None:
        self.stats["requests"] += 1
        try:
            reply_to = self.reply_topic(msg.topic)
        except (TopicError, UnicodeDecodeError) as exc:
            self.stats["bad_topic"] += 1
            self._bad_log.log(logging.WARNING, ("bad_topic", ""), "infer request on %r "
                              "dropped: %s", msg.topic, exc)
            return
        props = msg.properties
        named = getattr(props, "ResponseTopic", None)
        if named is not None and named != reply_to:
            self.stats["foreign_response_topic"] += 1
            self._bad_log.log(logging.WARNING, ("foreign_response_topic", reply_to),
                              "infer request on %s names ResponseTopic %r: answered on %s",
                              msg.topic, str(named)[:200], reply_to)
        corr = getattr(props, "CorrelationData", None)
        if corr is not None and len(corr) > MAX_CORRELATION_BYTES:
            self.stats["errors"] += 1
            self._reply(reply_to, None, {"error": f"CorrelationData of {len(corr)} bytes "
                                                  f"exceeds {MAX_CORRELATION_BYTES}"})
            return
        if not self._slots.acquire(blocking=False):
            self.stats["busy"] += 1
            self._reply(reply_to, corr, {"error": "busy: too many pending requests"})
            return
        try:
            self._pool.submit(self._serve, msg.topic, bytes(msg.payload), reply_to, corr)
        except RuntimeError:  # the pool is shutting down
            self._slots.release()

    def _serve(self, topic: str, payload: bytes, reply_to: str, corr: bytes | None) -> None:
        try:
            self._reply(reply_to, corr, self.answer(topic, payload))
        except Exception as exc:
            self.stats["internal"] += 1
            self._bad_log.log(logging.ERROR, ("internal", type(exc).__name__),
                              "infer request on %r failed: %r", topic, exc, exc_info=True)
        finally:
            self._slots.release()

    def answer(self, topic: str, payload: bytes) -> dict[str, Any]:
        """The reply for one request (also usable without MQTT)."""
        try:
            device, _leaf = self.topics.parse_device_topic(topic)
            env = Envelope.unpack(payload, max_payload=self.max_payload)
            if env.device != device:
                raise EnvelopeError(f"envelope device {env.device!r} != topic device")
            if env.meta.get("model", self.model_id) != self.model_id:
                raise EnvelopeError(f"model {env.meta.get('model')!r} is not served here")
            k = env.boundary
            if not 0 <= k < self.teacher.num_blocks:
                raise EnvelopeError(f"boundary {k} outside 0..{self.teacher.num_blocks - 1}")
            x = decode(env.payload, max_bytes=self.max_payload)
            want = self.teacher.boundary_shapes[k]
            if x.ndim != len(want) + 1 or x.shape[0] != 1 or tuple(x.shape[1:]) != want:
                raise EnvelopeError(f"boundary {k} shape {tuple(x.shape)} != (1, *{want})")
            if not np.isfinite(x).all():
                raise EnvelopeError("the activation holds NaN or Inf")
            with torch.no_grad():
                logits = self.teacher.run(torch.from_numpy(np.ascontiguousarray(x)), k + 1)
            probs = torch.softmax(logits[0], 0)
            conf, pred = probs.max(0)
        except (EnvelopeError, CodecError, TopicError) as exc:
            self.stats["errors"] += 1
            return {"error": str(exc)}
        self.stats["replies"] += 1
        return {"prediction": int(pred), "confidence": float(conf), "boundary": k,
                "model_version": env.model_version}

    def _reply(self, topic: str, corr: bytes | None, body: dict[str, Any]) -> None:
        props = Properties(PacketTypes.PUBLISH)
        if corr is not None:
            props.CorrelationData = corr
        self._client.publish(topic, json.dumps(body), qos=1, properties=props)
