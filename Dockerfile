# One image for every role; the entry point is the `chaos` command
# (chaos operator in the Helm chart's Deployment, chaos worker and chaos replicator in the
# worker pods; chaos run, chaos plan, chaos bench). Runs as uid 10001, which the chart's
# securityContext names.
FROM python:3.12-slim
WORKDIR /opt/chaos
COPY pyproject.toml README.md ./
COPY planner planner
COPY worker worker
COPY operator operator
COPY cli cli
RUN pip install --no-cache-dir . && useradd --uid 10001 --no-create-home chaos
USER 10001
ENTRYPOINT ["chaos"]
CMD ["--help"]
