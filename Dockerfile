# The image deploy/kuberay/rayservice.yaml runs: this repository installed on Ray's image.
#   docker build -t ghcr.io/expertmesh/expertmesh:0.1.0 .
# CUDA workers (the manifest's gpu-workers group, tag 0.1.0-cuda):
#   docker build -t ghcr.io/expertmesh/expertmesh:0.1.0-cuda \
#     --build-arg RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu \
#     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
# Ray's version must match pyproject.toml (ray[serve]==2.60.0) and the manifest's rayVersion.
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-cpu
FROM ${RAY_IMAGE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# a C++ compiler for the fused CPU expert kernel (built once below, cached in the image)
USER root
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
USER ray

WORKDIR /app
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users cluster ./cluster
COPY --chown=ray:users deploy ./deploy
COPY --chown=ray:users router ./router
COPY --chown=ray:users workers ./workers
RUN pip install --no-cache-dir torch==2.13.0 --index-url ${TORCH_INDEX} \
    && pip install --no-cache-dir -e . \
    && python -m workers.expert_kernel

# demo checkpoints are generated here on first use (the manifest mounts a volume on /models)
ENV EXPERTMESH_CACHE=/models/expertmesh
EXPOSE 8000 50051
CMD ["expertmesh", "serve", "--config", "deploy/configs/demo.yaml"]
