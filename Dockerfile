# syntax=docker/dockerfile:1
# keystrata container image: Node 24 on Debian bookworm (slim), compiled JavaScript, production
# dependencies only, running as the unprivileged `node` user.
#
#   docker build -t keystrata .
#   docker run --rm -p 127.0.0.1:8080:8080 -v keystrata-data:/data keystrata
#
# Debian slim rather than Alpine: glibc like the CI machine and every developer's, so the
# prebuilt binaries in node_modules (esbuild, under tsx) are the same builds the tests ran with.

ARG NODE_IMAGE=node:24-bookworm-slim

# ---- deps: every dependency, to compile with ------------------------------------------------
FROM ${NODE_IMAGE} AS deps
WORKDIR /app
COPY package.json package-lock.json ./
RUN --mount=type=cache,target=/root/.npm \
    npm ci --no-audit --no-fund

# ---- build: TypeScript -> dist/ (dist/src, dist/migrations) ----------------------------------
FROM deps AS build
COPY tsconfig.json tsconfig.build.json ./
COPY migrations ./migrations
COPY src ./src
RUN npx tsc -p tsconfig.build.json

# ---- prod-deps: production dependencies only ----------------------------------------------
FROM ${NODE_IMAGE} AS prod-deps
WORKDIR /app
COPY package.json package-lock.json ./
RUN --mount=type=cache,target=/root/.npm \
    npm ci --omit=dev --no-audit --no-fund

# ---- runtime --------------------------------------------------------------------------------
FROM ${NODE_IMAGE} AS runtime
LABEL org.opencontainers.image.title="keystrata" \
      org.opencontainers.image.description="Key management service for IoT fleets" \
      org.opencontainers.image.licenses="Apache-2.0"

# Listen on every interface inside the container; keep PGlite, the local root key and the local
# token issuer key (when those embedded defaults are used) on the /data volume.
ENV HOST=0.0.0.0 \
    PORT=8080 \
    KEYSTRATA_DATA_DIR=/data

WORKDIR /app
# Application files stay owned by root: the service can read them, not rewrite them.
COPY --from=prod-deps /app/node_modules ./node_modules
COPY package.json ./
COPY bin ./bin
COPY --from=build /app/dist ./dist

# The data directory belongs to `node`; `keystrata …` (the CLI) is on PATH for `docker exec`.
RUN mkdir -p /data \
 && chown node:node /data \
 && chmod 0700 /data \
 && ln -s /app/bin/keystrata.mjs /usr/local/bin/keystrata

USER node
VOLUME ["/data"]
EXPOSE 8080

# No curl in slim images: Node's own fetch asks /healthz (process alive).
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["node", "-e", "fetch('http://127.0.0.1:' + (process.env.PORT || 8080) + '/healthz', { signal: AbortSignal.timeout(4000) }).then((r) => process.exit(r.ok ? 0 : 1), () => process.exit(1))"]

CMD ["node", "dist/src/server.js"]
