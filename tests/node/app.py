"""The application of the node tests: prints what it was started with, then what its volume holds.

It runs in its own image (tests/node/images.sh) as the process of a Deployment that reads a Secret
through ``envFrom`` and a ConfigMap through a volume. The environment is fixed when the process
starts, so its log says which Secret value a Pod was started with: that is what a rollout changes.
The volume is re-read every second to show the other half (kubelet updates files in place).
"""

import os
import time
from pathlib import Path
from typing import NoReturn

VOLUME = Path(os.environ.get("APP_CONFIG_DIR", "/config"))


def main() -> NoReturn:
    print(f"started token={os.environ.get('TOKEN', '')}", flush=True)
    while True:
        for path in sorted(VOLUME.glob("[!.]*")):
            print(f"file {path.name}={path.read_text().strip()}", flush=True)
        time.sleep(1)


if __name__ == "__main__":
    main()
