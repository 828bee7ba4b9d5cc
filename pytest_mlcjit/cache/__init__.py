"""The cache: where every path lives (:mod:`.layout`), locks (:mod:`.locks`), trust
(:mod:`.trust`), manifests (:mod:`.manifest`), the run history (:mod:`.history`), the
stores (:mod:`.store`: local, read-only, tiered, remote) and their upkeep (:mod:`.manage`).

Knows nothing of pytest, of backends or of TVM, and starts no process; importing this
package imports nothing.
"""
