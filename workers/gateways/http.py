"""The `requests` session both SDKs are given: a connection per concurrent caller, and the
environment's proxy settings read once instead of on every request.

With `trust_env` on, `requests` walks the whole process environment for proxy variables on
every request: about 0.7 ms, a third of the client's CPU for a page of a hundred payments.
"""

from __future__ import annotations

import requests
import requests.adapters
import requests.utils


def http_session(base_url: str, connections: int) -> requests.Session:
    session = requests.Session()
    # One session is shared by the threads that call the gateway at once: keep a connection
    # for each of them (requests keeps 10 per host by default).
    adapter = requests.adapters.HTTPAdapter(pool_maxsize=connections)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    session.trust_env = False
    session.proxies.update(requests.utils.get_environ_proxies(base_url))
    return session
