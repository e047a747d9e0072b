#!/usr/bin/env bash
# Validates the deployment files under deploy/ without deploying anything:
#   1. every YAML file parses (all documents); Kubernetes manifests have apiVersion, kind,
#      metadata.name and no namespace; kustomization.yaml lists files that exist
#   2. every tollgate_* metric queried by the Grafana dashboard and the alert rules exists:
#      in the /metrics scrape given as $1, else in src/metrics.rs; with a scrape, the label
#      names used in selectors must exist on the metric too
#   3. promtool: check and unit-test the alert rules, check the compose Prometheus config and
#      the dashboard's PromQL; without promtool, a schema check of the rule file
#   4. docker compose config -q, when a Docker engine answers
#   5. systemd-analyze verify of the unit, when systemd-analyze works here
#   6. kubectl kustomize of deploy/kubernetes, when kubectl (or kustomize) is on PATH
#   7. tollgate check of the container and Kubernetes configs, when a tollgate binary exists
#      (TOLLGATE_BIN, target/release/tollgate, target/debug/tollgate or `tollgate` on PATH)
#   8. the Docker build's inputs exist, and the image's health probe compiles (rustc)
#
# Usage: scripts/validate-deploy.sh [SCRAPE_FILE]
#   SCRAPE_FILE  the text of a real `curl http://127.0.0.1:9090/metrics`
# Environment: TOLLGATE_INSTALL=1 (or CI=true) lets it apt-get install promtool when run as root.
# Exits non-zero when any check fails; a skipped check is reported, not failed.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
SCRAPE=${1:-}
if [[ -n "$SCRAPE" && ! -r "$SCRAPE" ]]; then
    echo "error: cannot read the scrape file $SCRAPE" >&2
    exit 2
fi
[[ -n "$SCRAPE" ]] && SCRAPE=$(cd "$(dirname "$SCRAPE")" && pwd)/$(basename "$SCRAPE")

TMP=$(mktemp -d "${TMPDIR:-/tmp}/validate-deploy.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

passed=0
failed=0
skipped=0
step() { printf '\n== %s\n' "$*"; }
ok() { printf '  ok: %s\n' "$*"; passed=$((passed + 1)); }
fail() { printf '  FAIL: %s\n' "$*"; failed=$((failed + 1)); }
skip() { printf '  SKIP: %s\n' "$*"; skipped=$((skipped + 1)); }
have() { command -v "$1" >/dev/null 2>&1; }
# Runs "$@" with its output indented; its exit status is the command's.
indent() { "$@" 2>&1 | sed 's/^/    /'; return "${PIPESTATUS[0]}"; }

# ---------------------------------------------------------------------------------------------
step "python3 with PyYAML"
if ! have python3; then
    echo "error: python3 is required" >&2
    exit 2
fi
PY=python3
if ! python3 -c 'import yaml' 2>/dev/null; then
    VENV=target/deploy-venv
    if [[ ! -x $VENV/bin/python ]] || ! $VENV/bin/python -c 'import yaml' 2>/dev/null; then
        echo "  PyYAML missing: installing it into $VENV"
        python3 -m venv "$VENV"
        "$VENV/bin/pip" install -q --disable-pip-version-check pyyaml
    fi
    PY=$VENV/bin/python
fi
echo "  using $PY ($($PY -c 'import sys, yaml; print(f"Python {sys.version.split()[0]}, PyYAML {yaml.__version__}")'))"

# ---------------------------------------------------------------------------------------------
step "1. YAML files under deploy/ parse; Kubernetes manifests are well-formed"
if indent "$PY" - <<'PY'; then ok "YAML"; else fail "YAML (see above)"; fi
import os, sys, yaml

bad = 0
files = sorted(
    os.path.join(d, f)
    for d, _, fs in os.walk("deploy")
    for f in fs
    if f.endswith((".yml", ".yaml"))
)
for path in files:
    try:
        with open(path) as fh:
            docs = [d for d in yaml.safe_load_all(fh) if d is not None]
    except yaml.YAMLError as err:
        print(f"FAIL {path}: {err}")
        bad += 1
        continue
    if not docs or not all(isinstance(d, dict) for d in docs):
        print(f"FAIL {path}: expected one or more mappings")
        bad += 1
        continue
    notes = []
    if path.startswith("deploy/kubernetes/"):
        if os.path.basename(path) == "kustomization.yaml":
            k = docs[0]
            for res in k.get("resources", []):
                if not os.path.exists(os.path.join("deploy/kubernetes", res)):
                    print(f"FAIL {path}: resource {res} does not exist")
                    bad += 1
            notes.append(f"{len(k.get('resources', []))} resources")
        else:
            for d in docs:
                meta = d.get("metadata") or {}
                what = f"{d.get('kind')}/{meta.get('name')}"
                if not d.get("apiVersion") or not d.get("kind") or not meta.get("name"):
                    print(f"FAIL {path}: a document lacks apiVersion, kind or metadata.name")
                    bad += 1
                elif "namespace" in meta:
                    print(f"FAIL {path}: {what} sets a namespace (the manifests are namespace-free)")
                    bad += 1
                notes.append(what)
    extra = f" ({', '.join(notes)})" if notes else ""
    print(f"ok   {path}: {len(docs)} document(s){extra}")
print(f"{len(files)} YAML files, {bad} problem(s)")
sys.exit(1 if bad or not files else 0)
PY

# ---------------------------------------------------------------------------------------------
if [[ -n "$SCRAPE" ]]; then
    step "2. metrics queried by the dashboard and the alerts exist in the scrape $SCRAPE"
else
    step "2. metrics queried by the dashboard and the alerts exist in src/metrics.rs (no scrape given)"
fi
if indent "$PY" - "$SCRAPE" <<'PY'; then ok "metric names"; else fail "metric names (see above)"; fi
import json, re, sys, yaml

scrape = sys.argv[1]
SUFFIXES = ("_bucket", "_sum", "_count")
NAME = re.compile(r"tollgate_[a-zA-Z0-9_]+")


def base(name):
    for s in SUFFIXES:
        if name.endswith(s):
            return name[: -len(s)]
    return name


known = set()
labels = {}  # base name -> label names seen on its samples (scrape only)
if scrape:
    sample = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s")
    with open(scrape) as fh:
        for line in fh:
            if line.startswith("# TYPE "):
                known.add(line.split()[2])
            elif line.strip() and not line.startswith("#"):
                m = sample.match(line)
                if m:
                    known.add(m.group(1))
                    names = set(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="', m.group(3) or ""))
                    labels.setdefault(base(m.group(1)), set()).update(names)
    source = scrape
else:
    with open("src/metrics.rs") as fh:
        known.update(re.findall(r'"(tollgate_[a-zA-Z0-9_]+)', fh.read()))
    source = "src/metrics.rs"
known_bases = {base(n) for n in known if n.startswith("tollgate_")}
if not known_bases:
    print(f"FAIL no tollgate_* metric found in {source}")
    sys.exit(1)
print(f"{len(known_bases)} tollgate metric families in {source}")

exprs = []  # (where, expr)
with open("deploy/grafana/tollgate.json") as fh:
    dash = json.load(fh)


def walk(panels):
    for p in panels:
        yield p
        yield from walk(p.get("panels", []))


for p in walk(dash.get("panels", [])):
    for t in p.get("targets", []):
        if t.get("expr"):
            exprs.append((f"dashboard panel {p.get('title')!r} {t.get('refId')}", t["expr"]))
for v in dash.get("templating", {}).get("list", []):
    q = v.get("query")
    q = q.get("query") if isinstance(q, dict) else q
    if v.get("type") == "query" and q:
        exprs.append((f"dashboard variable {v.get('name')}", q))
with open("deploy/prometheus/alerts.yml") as fh:
    for g in yaml.safe_load(fh)["groups"]:
        for r in g["rules"]:
            exprs.append((f"alert {r.get('alert') or r.get('record')}", str(r["expr"])))

bad = 0
used = set()
selector = re.compile(r"(tollgate_[a-zA-Z0-9_]+)\s*\{([^}]*)\}")
for where, expr in exprs:
    for name in set(NAME.findall(expr)):
        used.add(base(name))
        if base(name) not in known_bases:
            print(f"FAIL {where}: {name} is not in {source}")
            bad += 1
    if labels:
        for name, body in selector.findall(expr):
            have = labels.get(base(name))
            if not have:
                continue  # no samples of it in this scrape: nothing to compare with
            for label in re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", body):
                if label not in have | {"job", "instance", "le"}:
                    print(f"FAIL {where}: {name} has no label {label!r} in {source}")
                    bad += 1
print(f"{len(exprs)} expressions checked, using {len(used)} metric families: {', '.join(sorted(used))}")
unused = sorted(known_bases - used)
if unused:
    print(f"note: not queried anywhere: {', '.join(unused)}")
sys.exit(1 if bad else 0)
PY

# ---------------------------------------------------------------------------------------------
step "3. Prometheus rules (promtool)"
if ! have promtool; then
    if [[ $(id -u) -eq 0 && ("${CI:-}" == "true" || "${TOLLGATE_INSTALL:-}" == "1") ]] && have apt-get; then
        echo "  promtool not found: installing Debian's prometheus package (it ships promtool)"
        if ! indent bash -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null'; then
            echo "  could not install it"
        fi
    else
        echo "  promtool not found (set TOLLGATE_INSTALL=1 as root to apt-get install it)"
    fi
fi
if have promtool; then
    echo "  $(promtool --version 2>&1 | head -1)"
    if indent promtool check rules deploy/prometheus/alerts.yml; then
        ok "promtool check rules deploy/prometheus/alerts.yml"
    else
        fail "promtool check rules deploy/prometheus/alerts.yml"
    fi
    if indent promtool test rules deploy/prometheus/alerts.test.yml; then
        ok "promtool test rules deploy/prometheus/alerts.test.yml"
    else
        fail "promtool test rules deploy/prometheus/alerts.test.yml"
    fi
    # The compose config names the rule file by its path inside the container.
    sed "s#/etc/prometheus/alerts.yml#$ROOT/deploy/prometheus/alerts.yml#" \
        deploy/compose/prometheus.yml >"$TMP/prometheus.yml"
    if indent promtool check config "$TMP/prometheus.yml"; then
        ok "promtool check config deploy/compose/prometheus.yml"
    else
        fail "promtool check config deploy/compose/prometheus.yml"
    fi
    # The dashboard's queries, with Grafana's variables filled in, as recording rules: promtool
    # parses each one.
    if "$PY" - "$TMP/dashboard-rules.yml" <<'PY' && indent promtool check rules "$TMP/dashboard-rules.yml"; then
import json, sys, yaml

with open("deploy/grafana/tollgate.json") as fh:
    dash = json.load(fh)
subst = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h", "$project": ".*"}


def walk(panels):
    for p in panels:
        yield p
        yield from walk(p.get("panels", []))


rules = []
for p in walk(dash.get("panels", [])):
    for t in p.get("targets", []):
        expr = t.get("expr")
        if not expr:
            continue
        for k, v in subst.items():
            expr = expr.replace(k, v)
        rules.append({"record": f"dashboard:query_{len(rules) + 1}", "expr": expr})
with open(sys.argv[1], "w") as fh:
    yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, fh)
PY
        ok "the dashboard's PromQL parses"
    else
        fail "the dashboard's PromQL (rule N = the Nth query in deploy/grafana/tollgate.json)"
    fi
else
    skip "promtool unavailable: rules not evaluated, unit tests not run; schema check only"
    if indent "$PY" - <<'PY'; then ok "alerts.yml schema"; else fail "alerts.yml schema"; fi
import sys, yaml

bad = 0
with open("deploy/prometheus/alerts.yml") as fh:
    doc = yaml.safe_load(fh)
groups = doc.get("groups") if isinstance(doc, dict) else None
if not isinstance(groups, list) or not groups:
    print("FAIL alerts.yml: no `groups` list")
    sys.exit(1)
allowed = {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}
count = 0
for i, g in enumerate(groups):
    if not isinstance(g, dict) or not isinstance(g.get("name"), str) or not isinstance(g.get("rules"), list):
        print(f"FAIL groups[{i}]: needs `name` (string) and `rules` (list)")
        bad += 1
        continue
    for j, r in enumerate(g["rules"]):
        where = f"{g['name']}.rules[{j}]"
        count += 1
        if not isinstance(r, dict) or not isinstance(r.get("alert"), str) or not isinstance(r.get("expr"), str):
            print(f"FAIL {where}: needs `alert` and `expr` (strings)")
            bad += 1
            continue
        extra = set(r) - allowed
        if extra:
            print(f"FAIL {where} ({r['alert']}): unexpected keys {sorted(extra)}")
            bad += 1
        for key in ("labels", "annotations"):
            if key in r and not all(isinstance(v, str) for v in (r[key] or {}).values()):
                print(f"FAIL {where} ({r['alert']}): {key} must map to strings")
                bad += 1
print(f"{len(groups)} groups, {count} rules, {bad} problem(s)")
sys.exit(1 if bad else 0)
PY
fi

# ---------------------------------------------------------------------------------------------
step "4. docker compose config"
if ! have docker; then
    skip "no docker CLI"
elif ! docker compose version >/dev/null 2>&1; then
    engine="a Docker engine answers"
    docker info >/dev/null 2>&1 || engine="no Docker engine answers either"
    skip "the docker CLI has no compose plugin ('docker compose version' failed); $engine"
elif ! docker info >/dev/null 2>&1; then
    skip "no Docker engine answers ('docker info' failed)"
else
    # Placeholders for the variables compose requires (${VAR:?}), where unset: only the
    # file's validity is checked here.
    if indent env OPENAI_KEY_SEARCH="${OPENAI_KEY_SEARCH:-sk-placeholder}" \
        OPENAI_KEY_BATCH="${OPENAI_KEY_BATCH:-sk-placeholder}" \
        TOLLGATE_ADMIN_TOKEN="${TOLLGATE_ADMIN_TOKEN:-placeholder}" \
        docker compose -f deploy/compose/docker-compose.yml config -q; then
        ok "docker compose -f deploy/compose/docker-compose.yml config -q"
    else
        fail "docker compose -f deploy/compose/docker-compose.yml config -q"
    fi
fi

# ---------------------------------------------------------------------------------------------
step "5. systemd unit"
if ! have systemd-analyze; then
    skip "systemd-analyze is not installed"
else
    # Does it work here at all? A trivial unit must verify cleanly.
    printf '[Unit]\nDescription=probe\n[Service]\nExecStart=/bin/true\n' >"$TMP/probe.service"
    if ! probe=$(systemd-analyze verify "$TMP/probe.service" 2>&1) || [[ -n "$probe" ]]; then
        skip "systemd-analyze verify does not work here: ${probe:-exit status non-zero}"
    else
        # verify insists that ExecStart's binary exists; /usr/local/bin/tollgate is not
        # installed here, so a copy runs /bin/true with the same arguments. Warnings (unknown
        # keys, bad values) print but exit 0: any output counts as a failure.
        mkdir -p "$TMP/unit"
        sed 's#^ExecStart=/usr/local/bin/tollgate #ExecStart=/bin/true #' \
            deploy/systemd/tollgate.service >"$TMP/unit/tollgate.service"
        if out=$(systemd-analyze verify "$TMP/unit/tollgate.service" 2>&1) && [[ -z "$out" ]]; then
            ok "systemd-analyze verify deploy/systemd/tollgate.service"
            exposure=$(systemd-analyze security --offline=yes "$TMP/unit/tollgate.service" 2>/dev/null |
                grep -o 'Overall exposure level.*' || true)
            [[ -n "$exposure" ]] && echo "    systemd-analyze security: $exposure"
        else
            printf '%s\n' "$out" | sed "s#$TMP/unit/#deploy/systemd/#; s/^/    /"
            fail "systemd-analyze verify deploy/systemd/tollgate.service"
        fi
    fi
fi

# ---------------------------------------------------------------------------------------------
step "6. kustomize build of deploy/kubernetes"
if have kubectl && kubectl kustomize --help >/dev/null 2>&1; then
    KUSTOMIZE=(kubectl kustomize deploy/kubernetes)
elif have kustomize; then
    KUSTOMIZE=(kustomize build deploy/kubernetes)
else
    KUSTOMIZE=()
fi
if [[ ${#KUSTOMIZE[@]} -eq 0 ]]; then
    skip "neither kubectl nor kustomize is on PATH"
elif "${KUSTOMIZE[@]}" >"$TMP/kustomized.yaml" 2>"$TMP/kustomize.err"; then
    kinds=$(grep -E '^kind: ' "$TMP/kustomized.yaml" | sed 's/kind: //' | sort | uniq -c | awk '{printf "%s%s x%s", sep, $2, $1; sep=", "}')
    ok "${KUSTOMIZE[*]}: $kinds"
else
    sed 's/^/    /' "$TMP/kustomize.err"
    fail "${KUSTOMIZE[*]}"
fi

# ---------------------------------------------------------------------------------------------
step "7. tollgate check of the deployment configs"
BIN=${TOLLGATE_BIN:-}
if [[ -z "$BIN" ]]; then
    for candidate in target/release/tollgate target/debug/tollgate; do
        if [[ -x $candidate ]]; then BIN=$candidate; break; fi
    done
fi
if [[ -z "$BIN" ]] && have tollgate; then BIN=$(command -v tollgate); fi
if [[ -z "$BIN" ]]; then
    skip "no tollgate binary (set TOLLGATE_BIN or build it)"
else
    echo "  using $BIN"
    # Each config goes to a scratch directory, with the image's pricing path pointed at the
    # repository's table and placeholder values for the variables it names.
    "$PY" - "$TMP" "$ROOT/config/pricing.toml" <<'PY'
import os, sys, yaml

tmp, pricing = sys.argv[1], sys.argv[2]
with open("deploy/docker/tollgate.toml") as fh:
    docker = fh.read()
with open("deploy/kubernetes/configmap.yaml") as fh:
    k8s = yaml.safe_load(fh)["data"]["tollgate.toml"]
for name, text in (("docker", docker), ("kubernetes", k8s)):
    os.makedirs(os.path.join(tmp, name), exist_ok=True)
    with open(os.path.join(tmp, name, "tollgate.toml"), "w") as fh:
        fh.write(text.replace("/usr/share/tollgate/pricing.toml", pricing))
PY
    for name in docker kubernetes; do
        cfg=$TMP/$name/tollgate.toml
        vars=()
        while IFS= read -r var; do vars+=("$var=placeholder"); done < <(
            grep -oE '^\s*(api_key_env|token_env)\s*=\s*"[^"]+"' "$cfg" | sed -E 's/.*"([^"]+)"/\1/')
        src=deploy/docker/tollgate.toml
        [[ $name == kubernetes ]] && src="deploy/kubernetes/configmap.yaml (data.tollgate.toml)"
        if out=$(env "${vars[@]}" "$BIN" check --config "$cfg" 2>&1); then
            ok "tollgate check $src: $(printf '%s\n' "$out" | grep -E '^projects:' || true)"
        else
            printf '%s\n' "$out" | sed 's/^/    /'
            fail "tollgate check $src"
        fi
    done
fi

# ---------------------------------------------------------------------------------------------
step "8. Docker build inputs"
missing=0
# The repository files the Dockerfile's instructions (not its comments) name, besides the crate.
while read -r src; do
    [[ -z "$src" ]] && continue
    if [[ -e $src ]]; then echo "    ok   $src"; else echo "    FAIL $src is missing"; missing=1; fi
done < <(grep -vE '^[[:space:]]*#' deploy/docker/Dockerfile | grep -oE '(deploy|config)/[A-Za-z0-9_./-]+' | sort -u)
for f in Cargo.toml Cargo.lock deploy/docker/Dockerfile.dockerignore; do
    if [[ -e $f ]]; then echo "    ok   $f"; else echo "    FAIL $f is missing"; missing=1; fi
done
if [[ $missing -eq 0 ]]; then ok "files the Dockerfile reads exist"; else fail "files the Dockerfile reads"; fi
if have rustc; then
    # The same flags as the Dockerfile's builder stage.
    if indent rustc --edition 2021 -C opt-level=s -C strip=symbols -C panic=abort \
        -o "$TMP/tollgate-healthcheck" deploy/docker/healthcheck.rs; then
        ok "deploy/docker/healthcheck.rs compiles ($(du -k "$TMP/tollgate-healthcheck" | cut -f1) KB)"
    else
        fail "deploy/docker/healthcheck.rs does not compile"
    fi
else
    skip "rustc not on PATH: the health probe was not compiled"
fi

# ---------------------------------------------------------------------------------------------
printf '\nvalidate-deploy: %d passed, %d failed, %d skipped\n' "$passed" "$failed" "$skipped"
[[ $failed -eq 0 ]]
