# The local Prefect server, work pool, deployments, worker and data watcher (included from the Makefile).
#
#   make server        start the Prefect server on 127.0.0.1:$(PREFECT_PORT) in the background; prints the dashboard URL
#   make pool          create the `process` work pool $(WORK_POOL)
#   make deploy        prefect --no-prompt deploy --all (every deployment in prefect.yaml)
#   make worker        start a worker for the pool in the background (flow runs execute in this folder)
#   make watch         watch $(WATCH_PATH) for new data files and emit dataset.updated events (foreground)
#   make worker-stop / make server-stop / make server-status
#
# State lives in $(PREFECT_SERVER_HOME): PREFECT_HOME, the SQLite database prefect.db, logs and PID files.
# Processes are stopped through their PID files, never by name. Override e.g. `make server PREFECT_PORT=4300`.
BIN                ?= .venv/bin
PREFECT_PORT       ?= 4200
PREFECT_SERVER_HOME ?= ./workspace/prefect-server
WORK_POOL          ?= finetune
PREFECT_FILE       ?= prefect.yaml
WATCH_PATH         ?= data/incoming
WATCH_CONFIG       ?= configs/demo.yaml
WATCH_ARGS         ?=

PREFECT_LOCAL = BIN="$(BIN)" PREFECT_PORT="$(PREFECT_PORT)" PREFECT_SERVER_HOME="$(PREFECT_SERVER_HOME)" \
	WORK_POOL="$(WORK_POOL)" PREFECT_FILE="$(PREFECT_FILE)" bash scripts/prefect-local.sh

.PHONY: server server-stop server-status pool deploy worker worker-stop watch

server:
	@$(PREFECT_LOCAL) server-start

server-stop:
	@$(PREFECT_LOCAL) server-stop

server-status:
	@$(PREFECT_LOCAL) server-status

pool:
	@$(PREFECT_LOCAL) pool

deploy:
	@$(PREFECT_LOCAL) deploy

worker:
	@$(PREFECT_LOCAL) worker-start

worker-stop:
	@$(PREFECT_LOCAL) worker-stop

watch:
	@mkdir -p "$(WATCH_PATH)"
	PREFECT_HOME="$(PREFECT_SERVER_HOME)" PREFECT_API_URL="http://127.0.0.1:$(PREFECT_PORT)/api" \
		$(BIN)/finetune watch "$(WATCH_PATH)" --config "$(WATCH_CONFIG)" $(WATCH_ARGS)
