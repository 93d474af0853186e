"""Vendor a KubeRay CRD as test data, made small: only its storage version, no `description`s,
YAML flow style (a quarter of the upstream size).

    git -C <kuberay> show <tag>:<path> | python tests/k8s/crds/vendor_crd.py <tag> <commit> <path> > <out>
"""

import sys

import yaml


def strip(node, in_properties=False):
    """Drop schema `description`s; keys of a `properties` map are field names and stay."""
    if isinstance(node, list):
        return [strip(x) for x in node]
    if not isinstance(node, dict):
        return node
    return {k: strip(v, k == "properties" and not in_properties)
            for k, v in node.items() if in_properties or k != "description"}


def main() -> None:
    tag, commit, path = sys.argv[1:4]
    crd = strip(yaml.safe_load(sys.stdin))
    crd["spec"]["versions"] = [v for v in crd["spec"]["versions"] if v["storage"]]
    sys.stdout.write(
        f"# Source: https://github.com/ray-project/kuberay {path} at {tag} (commit {commit}).\n"
        "# Copyright The KubeRay Authors; Apache License 2.0 (https://www.apache.org/licenses/LICENSE-2.0).\n"
        "# Modified by tests/k8s/crds/vendor_crd.py (storage version only, descriptions removed); test data.\n")
    yaml.safe_dump(crd, sys.stdout, sort_keys=False, width=120, default_flow_style=True)


if __name__ == "__main__":
    main()
