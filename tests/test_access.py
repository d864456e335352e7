"""What the start-up permission check asks for follows the features the settings turn on.

Each grant asked for here is one ``refused`` checks with a SelfSubjectAccessReview before any watch
starts (``tests/test_chart_dropin.py`` runs that against a real server): a feature missing here
would start half-permitted and fail later, one 403 at a time.
"""

from __future__ import annotations

from reloader.access import required
from reloader.permissions import Permission
from reloader.settings import load_settings

CSI_WATCH = Permission("secrets-store.csi.x-k8s.io", "secretproviderclasspodstatuses", "watch")
POD_GET = Permission("", "pods", "get")


def test_csi_integration_asks_for_its_statuses_and_the_objects_they_lead_to() -> None:
    plain = required(load_settings(["--namespaces=a"]))
    csi = required(load_settings(["--namespaces=a", "--enable-csi-integration"]))
    assert CSI_WATCH not in plain["a"]
    assert {CSI_WATCH, POD_GET} <= csi["a"]


def test_ha_asks_for_the_lease_under_the_name_in_force() -> None:
    settings = load_settings(["--enable-ha", "--lease-name=my-lock", "--controller-namespace=ops"])
    lease = Permission("coordination.k8s.io", "leases", "update", "my-lock")
    assert lease in required(settings)["ops"]
    without = required(load_settings(["--controller-namespace=ops"]))
    assert not any(p.resource == "leases" for p in without["ops"])
