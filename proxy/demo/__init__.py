"""The demo of the verified restaurant-review platform: its data set, logins and policy."""

from __future__ import annotations

from proxy.demo.dataset import (
    DEMO_DATABASE,
    DEMO_LOGINS,
    POLICY_PATH,
    SCRIPT_PATH,
    DemoLogin,
    load_dataset,
)

__all__ = ["DEMO_DATABASE", "DEMO_LOGINS", "POLICY_PATH", "SCRIPT_PATH", "DemoLogin", "load_dataset"]
