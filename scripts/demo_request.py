"""Wait for the demo service to be ready, then print one recommendation response.

python scripts/demo_request.py 8000 42
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request


def main() -> None:
    port, user = int(sys.argv[1]), int(sys.argv[2])
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{base}/readyz", timeout=2) as response:
                if response.status == 200:
                    break
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            sys.exit(f"the service on {base} did not become ready; see its log")
        time.sleep(0.5)
    url = f"{base}/v1/recommendations/{user}?k=5&explain=true"
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.loads(response.read())
    print(f"GET {url}")
    print(json.dumps(body, indent=2))


if __name__ == "__main__":
    main()
