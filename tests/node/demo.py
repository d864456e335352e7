"""``make demo-cluster``: the in-cluster path, as an operator would see it.

1. Start the control plane and a real node (containerd, kubelet, kube-proxy; ``tests/node``) and
   build the images locally: the controller's from the Containerfile, and a small application's.
2. ``kubectl apply -k`` the cluster-wide overlay with the image pointed at the local build; show
   ``kubectl get pods -n reloader`` and ``kubectl logs -n reloader -l app=reloader``.
3. Deploy an application that reads a Secret through ``envFrom`` (auto annotation), rotate the
   Secret, and show the new Pod's log with the new value and the two ReplicaSets.

Needs root (the node); ``make demo`` is the quick out-of-cluster variant.
"""

from __future__ import annotations

from tests.node.node import Node, running_node
from tests.node.workloads import (
    apply,
    create_namespace,
    deploy_app,
    install,
    secret,
    started_with,
    wait_for,
)

NAMESPACE = "demo"


def say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def show(node: Node, *args: str) -> None:
    print(f"$ kubectl {' '.join(args)}", flush=True)
    print(node.kubectl(*args).stdout.rstrip(), flush=True)


def main() -> None:
    say("starting the control plane and the node, building the images (cached after the first)")
    with running_node() as node:
        say("installing manifests/overlays/cluster-wide with the image built locally")
        install(node, "cluster-wide")
        show(node, "get", "pods", "-n", "reloader", "-o", "wide")
        show(node, "logs", "-n", "reloader", "-l", "app=reloader", "--tail=5")

        say("an application reading Secret app-secret (TOKEN=v1) through envFrom, auto annotation")
        create_namespace(node, NAMESPACE)
        deploy_app(node, NAMESPACE)
        show(node, "logs", "-n", NAMESPACE, "-l", "app=app", "--tail=3")

        say("rotating the Secret: TOKEN=v2")
        apply(node, secret(NAMESPACE, "v2"))
        wait_for(lambda: started_with(node, NAMESPACE) == "v2", message="a Pod started with v2")
        show(node, "get", "replicasets", "-n", NAMESPACE)
        show(node, "logs", "-n", NAMESPACE, "-l", "app=app", "--tail=3")
        show(node, "logs", "-n", "reloader", "-l", "app=reloader", "--tail=3")
        say("done; stopping the node and the control plane")


if __name__ == "__main__":
    main()
