"""The wire ring: IPv6 header chains as offset views over bytes, checksums.

Nothing here imports Twisted or scapy; everything is a pure function of bytes.
"""
