# A rollshare node: `docker run rollshare run --bootstrap HOST:4102`, or see docker-compose.yml.
#
# CPU only. For a GPU, start from a CUDA image and install the torch build you want instead
# of the CPU wheel below. State (identity key, rollout store, checkpoints, model cache) lives
# in the /data volume: keep it and the node comes back with the same peer id and store.
FROM python:3.11-slim

# libp2p's fastecdsa dependency compiles against GMP
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libgmp-dev \
    && rm -rf /var/lib/apt/lists/*

# torch first, from the CPU index: an unpinned torch from PyPI pulls a multi-GB CUDA build.
# Its own layer, so that changing rollshare does not download it again.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /src
COPY pyproject.toml README.md ./
COPY policies/ policies/
COPY node/ node/
RUN pip install --no-cache-dir . && rm -rf /src

# an unprivileged user owns the data volume (a fresh named volume copies this ownership)
RUN useradd --create-home --uid 1000 rollshare && mkdir /data && chown rollshare:rollshare /data
USER rollshare
WORKDIR /data
VOLUME /data

# every `rollshare run` flag also reads ROLLSHARE_<FIELD> (see `rollshare run --help`)
ENV ROLLSHARE_DATA_DIR=/data \
    ROLLSHARE_LISTEN_HOST=0.0.0.0 \
    PYTHONUNBUFFERED=1 \
    TOKENIZERS_PARALLELISM=false

# libp2p (TCP) and gRPC
EXPOSE 4101 4102

ENTRYPOINT ["rollshare"]
CMD ["run"]
