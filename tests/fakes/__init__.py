"""In-process fakes of the cloud services graphsync talks to, served over real HTTP(S).

They exist so tests exercise the real client libraries (MSAL, requests) end to end, while
the test controls lifetimes, failures and latency and can count the requests made.

Import from the submodules (``from tests.fakes.entra import FakeEntra``); this package
deliberately imports nothing, so ``python -m tests.fakes.entra`` runs cleanly.
"""
