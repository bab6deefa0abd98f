"""Federation between parties: identities, mutually authenticated TLS, the sync protocol.

* `identity`: a party's CA and operator certificate (`chaos identity init`), SPKI fingerprints;
* `tls`: server and client TLS contexts, pinning by `caBundle` or `keyFingerprint`;
* `protocol`: the versioned JSON messages the operators exchange;
* `rules`: pure functions from stored remote state to a job's federation view and to a
  `ChaosPeer`'s status;
* `service`: the HTTPS server and the sync loop that run inside `chaos operator`.
"""
