"""The wire between members: framing, TCP transport, link shaping, the control link."""
