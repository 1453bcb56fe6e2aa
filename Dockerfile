# The fedmq image: the `fedmq` command (split, aggregator, worker, broker admin) on Python 3.11.
# Used by compose.yaml (docs/compose.md); on its own: `docker build -t fedmq . && docker run --rm fedmq --help`.
#
# The package is installed the way the README and the Makefile install it, with pip from the
# project directory (`pip install -e '.[test,dev]'` there; here `pip install .`: no editable
# install, no test or dev extras). The runtime dependencies are read from pyproject.toml and
# installed in a layer of their own, so editing the sources does not reinstall numpy and co.
FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system --gid 10001 fedmq \
 && useradd --system --uid 10001 --gid fedmq --home-dir /home/fedmq --create-home --shell /usr/sbin/nologin fedmq

WORKDIR /src

# 1. Dependencies only: [project].dependencies of pyproject.toml (markers included), via tomllib.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# 2. The package itself, from the project directory, without touching the dependencies again.
COPY README.md ./
COPY shared ./shared
COPY broker ./broker
COPY worker ./worker
COPY aggregator ./aggregator
COPY fedmq ./fedmq
RUN pip install --no-deps . \
 && cd / && rm -rf /src \
 && fedmq --version

COPY deploy/worker-entrypoint.sh /usr/local/bin/fedmq-worker-entrypoint
RUN chmod 0755 /usr/local/bin/fedmq-worker-entrypoint \
 && mkdir -p /data /runs \
 && chown fedmq:fedmq /data /runs

# Named volumes mounted on /data and /runs start with this ownership, so the split, the
# aggregator and the workers can write there as the unprivileged user.
USER fedmq
WORKDIR /home/fedmq
ENTRYPOINT ["fedmq"]
