# The one runtime image of critbatch: cell Jobs (torchrun ... critbatch.jobs.cli train) and the analysis
# Job (critbatch analyze) both run it.
#
#   docker build -t critbatch:latest .
#   docker build --build-arg BASE_IMAGE=python-bookworm-local -t critbatch:dev .   # a plain Python base
#   images/build.sh --tag critbatch:dev --kind critbatch                           # build + kind load
#
# BASE_IMAGE: a CUDA PyTorch runtime by default (torch comes with it); any Debian-like image with
# python3 and venv works, torch is then installed from images/requirements-torch.txt.
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime
FROM ${BASE_IMAGE}

# auto: install torch and torchvision when the base lacks them; never: keep the base's as they are
# (a base with a CPU-only torch and no torchvision still runs every model but the torchvision ones).
ARG INSTALL_TORCH=auto

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/critbatch/venv \
    PATH=/opt/critbatch/venv/bin:$PATH

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# A virtual environment that sees the base image's packages: the base's torch (built for its CUDA) is
# used as is, and pip never touches the system Python (PEP 668). Dependencies first, in their own layer,
# so a change to the code rebuilds only the last steps. The cell Jobs run `torchrun`: when torch comes
# from the base, the base's torchrun would start the base's Python, which cannot see this environment,
# so the environment gets a torchrun of its own (checked before the step ends).
COPY images/requirements.txt images/requirements-torch.txt /opt/critbatch/
RUN python3 -m venv --system-site-packages "$VIRTUAL_ENV" \
    && if [ "$INSTALL_TORCH" = auto ] && ! python -c "import torch, torchvision" 2>/dev/null; then \
        pip install -r /opt/critbatch/requirements-torch.txt; \
    fi \
    && pip install -r /opt/critbatch/requirements.txt \
    && if [ ! -e "$VIRTUAL_ENV/bin/torchrun" ]; then \
        printf '#!%s/bin/python\nimport sys\nfrom torch.distributed.run import main\nsys.exit(main())\n' \
            "$VIRTUAL_ENV" > "$VIRTUAL_ENV/bin/torchrun" \
        && chmod 755 "$VIRTUAL_ENV/bin/torchrun"; \
    fi \
    && python -c "import shutil, sys; w = shutil.which('torchrun'); \
assert open(w).readline()[2:].strip().startswith(sys.prefix + '/'), w"

# The package (.dockerignore lets through only pyproject.toml, README.md, jobs/, analysis/, k8s/, images/),
# and the non-root user the manifests run as (runAsUser/runAsGroup 1000). Some bases already have
# uid 1000 (Ubuntu 24.04's "ubuntu"): then that account is the one used.
# CRITBATCH_COMMIT: the commit the image is built from (images/build.sh passes `git describe`), so every
# cell.json and _SUCCESS written in a pod says which code ran.
ARG CRITBATCH_COMMIT=""
ENV CRITBATCH_COMMIT=${CRITBATCH_COMMIT}
WORKDIR /opt/critbatch/src
COPY . ./
RUN pip install --no-deps . \
    && critbatch --version \
    && if ! getent group 1000 >/dev/null; then groupadd --gid 1000 critbatch; fi \
    && if ! getent passwd 1000 >/dev/null; then \
        useradd --uid 1000 --gid 1000 --home-dir /home/critbatch --create-home --shell /usr/sbin/nologin critbatch; \
    fi
USER 1000:1000
WORKDIR /home/critbatch

ENTRYPOINT ["critbatch"]
CMD ["--help"]
