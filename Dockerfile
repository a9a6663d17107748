# The project on Ray's own image, for KubeRay (examples/kuberay-rayservice.yaml) or `ray start` nodes.
#   docker build --build-arg CUDA=cu128 -t embedding-cluster:2.60.0-cu128 .   # a CUDA 12.8 image
#   docker build --build-arg CUDA=cpu -t embedding-cluster:2.60.0-cpu .       # no CUDA
# CUDA names both the Ray image's variant (rayproject/ray:RAY_VERSION-py311-CUDA) and the torch
# build (download.pytorch.org/whl/CUDA): pick one that both publish.
ARG RAY_VERSION=2.60.0
ARG CUDA=cu128
FROM rayproject/ray:${RAY_VERSION}-py311-${CUDA}
ARG RAY_VERSION
ARG CUDA

WORKDIR /home/ray/embedding-cluster
COPY --chown=ray:users pyproject.toml constraints.txt README.md ./
COPY --chown=ray:users embedder embedder
COPY --chown=ray:users deployments deployments
COPY --chown=ray:users cluster cluster
COPY --chown=ray:users examples examples

# torch at constraints.txt's pin, in the build for CUDA; then the project, keeping the image's Ray
RUN pip install --no-cache-dir -c constraints.txt --index-url "https://download.pytorch.org/whl/${CUDA}" torch \
 && pip install --no-cache-dir -c constraints.txt "ray[serve,data]==${RAY_VERSION}" . \
 && python -c "import ray, torch, cluster.app; assert ray.__version__ == '${RAY_VERSION}', ray.__version__"
