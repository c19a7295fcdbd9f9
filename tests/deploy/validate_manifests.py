"""Validates Kubernetes and Istio manifests offline, the way `kubectl apply
--validate=strict` would against a cluster with Istio's CRDs installed.

    validate_manifests.py SCHEMA_DIR FILE_OR_DIR...

- Istio kinds (`*.istio.io` API groups) against the CRD's openAPIV3Schema in
  SCHEMA_DIR (`{Kind}-{first label of the group}-{version}.json`). The API server
  prunes or, with strict field validation, refuses fields its schema does not declare;
  a plain JSON Schema validator lets them through, so every object schema under `spec`
  that declares its properties is closed here (`additionalProperties: false`) unless it
  says `x-kubernetes-preserve-unknown-fields` (pluginConfig, EnvoyFilter patch values).
- Kubernetes kinds with the PyPI package kubernetes-validate (its bundled schemas,
  strict: unknown fields are errors), for the Kubernetes version below.

Prints one line per object (`ok Kind namespace/name` or `error ...: reason`) and exits
1 if any object failed, 2 on usage errors.
"""

import json
import pathlib
import sys

import jsonschema
import kubernetes_validate
import yaml

KUBERNETES_VERSION = "1.37.0"


def closed(schema):
    """The schema with every declared object closed to undeclared fields."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) for k, v in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def istio_validator(schema_dir, api_version, kind):
    group, version = api_version.split("/")
    path = schema_dir / f"{kind}-{group.split('.')[0]}-{version}.json"
    if not path.is_file():
        raise LookupError(f"no schema for {api_version} {kind} ({path.name})")
    schema = json.loads(path.read_text())
    schema["properties"]["spec"] = closed(schema["properties"]["spec"])
    # What every object has besides spec; the CRD schema leaves these to the server.
    schema["properties"].update(
        apiVersion={"const": api_version},
        kind={"const": kind},
        metadata={
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"},
                "namespace": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
            },
            "additionalProperties": False,
        },
    )
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    schema["additionalProperties"] = False
    return jsonschema.Draft7Validator(schema)


def validate(schema_dir, doc):
    api_version, kind = doc.get("apiVersion", ""), doc.get("kind", "")
    if api_version.split("/")[0].endswith(".istio.io"):
        errors = sorted(
            istio_validator(schema_dir, api_version, kind).iter_errors(doc),
            key=lambda e: list(e.absolute_path),
        )
        return [f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in errors]
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{'.'.join(map(str, e.path)) or '(root)'}: {e.message}"]
    return []


def main(argv):
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    schema_dir = pathlib.Path(argv[1])
    files = []
    for arg in map(pathlib.Path, argv[2:]):
        files += sorted(arg.rglob("*.yaml")) if arg.is_dir() else [arg]
    failed = 0
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None:
                continue
            meta = doc.get("metadata") or {}
            what = f"{doc.get('kind')} {meta.get('namespace', '-')}/{meta.get('name')} ({path.name})"
            try:
                errors = validate(schema_dir, doc)
            except (LookupError, kubernetes_validate.SchemaNotFoundError) as e:
                errors = [str(e)]
            if errors:
                failed += 1
                for error in errors:
                    print(f"error {what}: {error}")
            else:
                print(f"ok {what}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
