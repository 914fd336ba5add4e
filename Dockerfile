# knet-trainer image: the cloud side (torch CPU build, APScheduler, Mosquitto tools for
# provisioning). Build: docker build -t knet-trainer .
# Run:   docker run -d --name knet-trainer -v $PWD/trainer.toml:/etc/knet/trainer.toml:ro \
#            -v $PWD/keys:/etc/knet/keys:ro -v knet-data:/var/lib/knet knet-trainer
#        (the daemon: `knet-trainer --config /etc/knet/trainer.toml`; keep [trainer].state_dir
#        under /var/lib/knet, the volume; SIGTERM from `docker stop` publishes `offline`)
# Jobs:  docker exec knet-trainer knet-trainer --config /etc/knet/trainer.toml jobs list
#        docker exec knet-trainer knet-trainer --config /etc/knet/trainer.toml jobs run-now JOB
# The base is pinned by digest so that a rebuild gets the same OS and Python. No registry is
# reachable where this file is maintained: the digest is the one Docker Hub published for
# python:3.11-slim-bookworm (the multi-arch index), as used in several public images. To move
# it forward (security updates), on a machine with registry access:
#   docker buildx imagetools inspect python:3.11-slim-bookworm   # prints "Digest: sha256:..."
# and replace the digest below; the tag stays for the reader.
FROM python:3.11-slim-bookworm@sha256:a36c24f9cbdf4fd0f52d67f0823eeac19c2028c637cecc392d97f980d4fec56b

ARG TORCH_VERSION=2.13.0
# The CPU wheel index keeps the image small; an unpinned torch pulls a multi-GB CUDA build.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN apt-get update \
 && apt-get install -y --no-install-recommends mosquitto mosquitto-clients \
 && rm -rf /var/lib/apt/lists/*

RUN useradd --system --home /var/lib/knet --create-home knet
WORKDIR /opt/knet

RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
# Dependencies from the constraints file first, in their own layer: editing the source does
# not reinstall them (only the last `pip install --no-deps` below reruns).
COPY constraints/trainer.txt ./constraints/trainer.txt
RUN grep -v '^torch==' constraints/trainer.txt > /tmp/deps.txt \
 && pip install --no-cache-dir -r /tmp/deps.txt && rm /tmp/deps.txt
COPY pyproject.toml README.md ./
# The daemon, the device side it shares, the broker tools and the operator CLI (`knet`);
# not the lab (knet_lab: the demo and fleet harness) nor the benchmarks (bench).
COPY agent ./agent
COPY cloud_trainer ./cloud_trainer
COPY broker ./broker
COPY knet_cli ./knet_cli
COPY firmware_profiles ./firmware_profiles
RUN pip install --no-cache-dir --no-deps . && pip check

USER knet
VOLUME ["/var/lib/knet"]
ENV KNET_CACHE=/var/lib/knet/cache \
    KNET_PROFILES=/opt/knet/firmware_profiles
# Healthy while the daemon's job store answers (the scheduler is up and the volume readable).
HEALTHCHECK --interval=60s --timeout=20s --start-period=120s --retries=3 \
  CMD ["knet-trainer", "--config", "/etc/knet/trainer.toml", "jobs", "list"]
ENTRYPOINT ["knet-trainer"]
CMD ["--config", "/etc/knet/trainer.toml"]
