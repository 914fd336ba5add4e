"""Split inference: a device runs student blocks 1..k, the cloud finishes with teacher k+1..N.

Requests arrive on ``knet/v1/{fleet}/{device}/infer`` as activation envelopes (boundary k);
the reply goes to the request's MQTT v5 ``ResponseTopic`` with its ``CorrelationData``, as
JSON ``{"prediction", "confidence", "boundary", "model_version"}`` or ``{"error": ...}`` —
a request that cannot be served gets an error reply, never silence. A bounded worker pool
keeps a burst of requests from growing memory: when it is full, new requests are answered
``busy`` at once.
"""

from __future__ import annotations

import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import torch
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.codec import CodecError, decode
from agent.envelope import Envelope, EnvelopeError
from agent.topics import TopicError, Topics
from cloud_trainer.blocks import BlockModel

log = logging.getLogger(__name__)


class SplitServer:
    """Serves teacher blocks k+1..N for every device of a fleet."""

    def __init__(self, teacher: BlockModel, model_id: str, topics: Topics, host: str,
                 port: int, *, username: str | None = None, password: str | None = None,
                 workers: int = 2, max_pending: int = 64, client_id: str = "knet-split",
                 max_payload: int = 16 * 2**20) -> None:
        self.teacher = teacher.eval()
        self.model_id = model_id
        self.topics = topics
        self.max_payload = max_payload
        self.stats = {"requests": 0, "replies": 0, "errors": 0, "busy": 0}
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="knet-split")
        self._slots = threading.BoundedSemaphore(max_pending)
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                   protocol=mqtt.MQTTv5)
        if username:
            self._client.username_pw_set(username, password)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._host, self._port = host, port
        self.connected = threading.Event()

    def __enter__(self) -> SplitServer:
        self._client.connect(self._host, self._port, keepalive=30)
        self._client.loop_start()
        return self

    def __exit__(self, *_: object) -> None:
        self._pool.shutdown(wait=True)
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(self, client: mqtt.Client, *_: Any) -> None:
        client.subscribe(self.topics.all_devices("infer"), qos=1)
        self.connected.set()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        self.stats["requests"] += 1
        props = msg.properties
        reply_to = getattr(props, "ResponseTopic", None)
        corr = getattr(props, "CorrelationData", None)
        if not reply_to:
            self.stats["errors"] += 1
            log.warning("infer request on %s without a ResponseTopic: cannot answer", msg.topic)
            return
        if not self._slots.acquire(blocking=False):
            self.stats["busy"] += 1
            self._reply(reply_to, corr, {"error": "busy: too many pending requests"})
            return
        self._pool.submit(self._serve, msg.topic, bytes(msg.payload), reply_to, corr)

    def _serve(self, topic: str, payload: bytes, reply_to: str, corr: bytes | None) -> None:
        try:
            self._reply(reply_to, corr, self.answer(topic, payload))
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
            if tuple(x.shape[1:]) != want:
                raise EnvelopeError(f"boundary {k} shape {tuple(x.shape[1:])} != {want}")
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
