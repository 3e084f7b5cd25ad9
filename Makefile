# vote-aggregator — the commands users run. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# Test servers: the test kit picks the images itself (VOTES_POSTGRES_IMAGE /
# VOTES_RABBITMQ_IMAGE if set, else the offline images if `make images` built them, else
# the official ones); see testkit/src/infra/images.rs.

# The fault-injection replica binary only the chaos suite runs, kept apart from every
# ordinary build (Cargo would otherwise unify the feature into them).
CARGO_TARGET := $(or $(CARGO_TARGET_DIR),target)
FAULT_BINARY := $(CARGO_TARGET)/debug/fault-injection/vote-aggregator

VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
REVISION := $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
OFFLINE_BASE_IMAGE := vote-aggregator/debian:trixie-offline
# The runtime base: the official one unless `make images` built the offline stand-in.
BASE_IMAGE ?= $(shell docker image inspect $(OFFLINE_BASE_IMAGE) >/dev/null 2>&1 && echo $(OFFLINE_BASE_IMAGE) || echo debian:trixie-slim)

.PHONY: help images image image-test test deploy-test supply-chain k8s-validate monitoring-test dlq-retention up down ps logs stats publish roles backup restore chaos chaos-cluster load demo build release fault-build lint fmt init-db-sql clean-containers

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

images: ## (root) build offline PostgreSQL 17, RabbitMQ 4.0, Prometheus 2.53 + Debian trixie base images from Debian packages (only without registry access)
	images/build.sh

monitoring-test: images ## promtool: check prometheus.yml + alerts.yml, unit-test the alerts; the Grafana dashboard checked statically (offline Prometheus image)
	scripts/monitoring-test.sh

test: images fault-build ## run every test against real PostgreSQL and RabbitMQ containers (builds missing images first)
	cargo build --workspace --locked   # the suites run the real binaries
	cargo test --workspace --locked

chaos: fault-build ## every chaos scenario, 60 s of faults each + drain (~10 min; SCENARIO=name, DURATION=60s, SEED=n to replay)
	cargo build --locked -p vote-tools
	$(CARGO_TARGET)/debug/vote-tools chaos --scenario $(or $(SCENARIO),all) --duration $(or $(DURATION),60s) $(if $(SEED),--seed $(SEED))

chaos-cluster: fault-build ## the broker-cluster chaos scenarios (3 RabbitMQ nodes), 120 s of faults each + drain (~12 min; SCENARIO=name, DURATION=120s, RATE=200, SEED=n)
	cargo build --locked -p vote-tools
	$(CARGO_TARGET)/debug/vote-tools chaos --scenario $(or $(SCENARIO),cluster) --duration $(or $(DURATION),120s) --rate $(or $(RATE),200) $(if $(SEED),--seed $(SEED))

load: ## capacity baselines vs this machine's broker and database ceilings (~10 min) -> target/load/report.{json,md}, throughput.png
	cargo build --release --locked -p vote-aggregator -p vote-tools
	$(CARGO_TARGET)/release/vote-tools load -n $(or $(VOTES),200000) --steady-seconds 8 --out target/load $(ARGS)

demo: ## start servers + 3 replicas, publish 20 000 votes with duplicates, show the results (ARGS=--keep to leave it running)
	cargo build --workspace --locked
	$(CARGO_TARGET)/debug/vote-tools demo $(ARGS)

build: ## debug build of the service and the tools
	cargo build --workspace --locked

fault-build: ## the chaos suite's fault-injection replica -> target/debug/fault-injection/ (never deploy it)
	@# The ordinary binary is put back in place whether or not the first steps worked.
	cargo build --locked -p vote-aggregator --bin vote-aggregator --features fault-injection \
	  && mkdir -p $(dir $(FAULT_BINARY)) && cp $(CARGO_TARGET)/debug/vote-aggregator $(FAULT_BINARY); \
	  rc=$$?; cargo build --locked -p vote-aggregator --bin vote-aggregator && exit $$rc

image: images ## the service image vote-aggregator:$(VERSION) and :latest (release build on the trixie base)
	cargo build --release --locked -p vote-aggregator --bin vote-aggregator
	docker build --build-arg BASE_IMAGE=$(BASE_IMAGE) --build-arg VERSION=$(VERSION) \
	  --build-arg REVISION=$(REVISION) -t vote-aggregator:$(VERSION) -t vote-aggregator:latest .

image-test: image ## check the service image: user, ports, labels, health check, clean stop, no fault hooks
	scripts/image-test.sh vote-aggregator:$(VERSION) $(CARGO_TARGET)/release/vote-aggregator

deploy-test: image build ## the compose stack under load: kill, crash, scale 3-5-2-3, rolling upgrade + rollback, server restarts, checker (~4 min) -> target/deploy/
	$(CARGO_TARGET)/debug/vote-tools deploy-test --image vote-aggregator:$(VERSION) --out-dir $(CARGO_TARGET)/deploy $(ARGS)

# The compose stack (docker-compose.yml) through deploy/compose.sh: settings from the
# environment, then .env (deploy/env.sh), the offline server images when present, and
# deploy/secrets/ written once.
COMPOSE := deploy/compose.sh

up: image ## start the stack: PostgreSQL, RabbitMQ, migration, 3 replicas, Prometheus (builds what is missing)
	$(COMPOSE) up -d --no-recreate
	@$(COMPOSE) ps
	@. deploy/env.sh && echo && \
	  echo "vote-aggregator is up (compose project $$COMPOSE_PROJECT_NAME, 3 replicas):" && \
	  echo "  every replica's metrics   http://$$PUBLISH_ADDRESS:$$PROMETHEUS_PORT/targets  (Prometheus; query vote_aggregator_votes_counted_total)" && \
	  echo "  RabbitMQ management UI    http://$$PUBLISH_ADDRESS:$$RABBITMQ_UI_PORT  (user $$RABBITMQ_USER, password in $$SECRETS_DIR/rabbitmq_password)" && \
	  echo "  publish test votes        make publish VOTES=10" && \
	  echo "  read the results          make stats" && \
	  echo "  logs / status / stop      make logs · make ps · make down"

down: ## stop and remove the stack's containers (data volumes stay; ARGS=-v removes them too)
	$(COMPOSE) down $(ARGS)

ps: ## the stack's containers and their health
	$(COMPOSE) ps

logs: ## follow the stack's logs (SERVICE=aggregator for one service)
	$(COMPOSE) logs -f --tail=100 $(SERVICE)

dlq-retention: ## apply the dead-letter retention policy (deploy/rabbitmq/30-dead-letter-retention.conf) to the stack's existing broker
	deploy/rabbitmq/apply-retention.sh

stats: ## print vote_statistics from the stack's database
	$(COMPOSE) exec -T postgres sh -c 'psql -U "$$POSTGRES_USER" -d "$$POSTGRES_DB" -c "SELECT * FROM vote_statistics"'

backup: ## pg_dump (custom format) of the stack's database -> BACKUP_DIR (backups/)/<project>-<db>-<UTC time>.dump, mode 0600, checked; keeps the BACKUP_KEEP (14) newest
	deploy/backup.sh

restore: ## replace the stack's database by FILE=backups/....dump: replicas stopped, restored, migrated, verified, replicas started
	deploy/restore.sh "$(FILE)"

roles: ## (re)create the stack's PostgreSQL runtime user with scripts/roles.sql (other servers: see README "Database roles")
	$(COMPOSE) run --rm --no-deps roles

publish: build ## publish VOTES (default 10) test votes to the stack's RabbitMQ with confirms
	deploy/publish.sh $(CARGO_TARGET)/debug/vote-tools -n $(or $(VOTES),10)

release: ## optimised build: target/release/vote-aggregator
	cargo build --release --locked -p vote-aggregator

lint: ## what CI checks besides the tests
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --locked -- -D warnings
	RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked

supply-chain: ## cargo-deny: licences, banned/duplicate crates, crates.io-only sources (deny.toml); advisories when reachable
	scripts/supply-chain.sh

k8s-validate: ## deploy/k8s/ offline: Kubernetes 1.33 and 1.37 schemas (pinned kubernetes-validate, installed once into target/k8s/venv), custom resources' structure, cross-references
	scripts/k8s-validate.sh

fmt: ## format the code
	cargo fmt --all

init-db-sql: ## write init_db.sql (the schema for psql) from migrations/
	scripts/init-db-sql.sh init_db.sql

clean-containers: ## remove test containers left behind by killed test runs
	@ids=$$(docker ps -aq --filter label=vote-aggregator.test=1); \
	  if [ -n "$$ids" ]; then docker rm -fv $$ids; else echo "no test containers"; fi
