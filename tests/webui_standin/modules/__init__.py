"""A stand-in for the webui's ``modules`` package, for tests of lib_merge.hosts.webui ONLY.

The webui (AUTOMATIC1111 v1.10.1) cannot be installed from a package registry, so the adapter's
contract is tested against these small modules, which copy the behaviour the adapter relies on:
checkpoint titles ``name [sha256[:10]]`` built from the hash cache, ``list_models`` rescanning the
folder, ``opts.set``/``save``, ``shared.state``'s job fields, ``progress``'s task bookkeeping and a
queue lock that, like the webui's FIFOLock, cannot be taken twice. Each module names what it copies.
The real webui is exercised by tests/test_webui_e2e.py when MERGE_LAB_WEBUI points at one.
"""
