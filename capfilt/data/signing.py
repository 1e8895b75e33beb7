"""Signed URLs: a shard's identity without the credential that a presigned URL carries.

A presigned URL (S3's or GCS's query signature, an Azure SAS, a CloudFront signed URL) lets whoever holds
it read the object until it expires, and it is signed anew for each run. So a run names each input shard
by its URL without the signing parameters: the manifest, stats, done markers, the Parquet ``shard`` column
and the dataset card never hold a credential, and a rerun with freshly signed URLs is the same run over
the same shards. Only reading uses the signed URL.
"""

from __future__ import annotations

import re
import urllib.parse

# Query parameters that sign a URL (matched without case): AWS SigV4 and GCS V4 (every X-Amz-* and
# X-Goog-* parameter), AWS SigV2, GCS V2 and Alibaba OSS, CloudFront, and bare tokens.
SIGNING_PREFIXES = ("x-amz-", "x-goog-")
SIGNING_NAMES = {
    *("awsaccesskeyid", "googleaccessid", "ossaccesskeyid", "signature", "expires"),
    *("policy", "key-pair-id", "token", "access_token"),
}
# An Azure SAS: these only sign a URL that has a ``sig`` (``sv`` or ``sp`` alone may mean anything else).
SAS_NAMES = {
    *("sig", "sv", "ss", "srt", "sp", "se", "st", "spr", "sip", "si", "sr", "sdd", "ses"),
    *("skoid", "sktid", "skt", "ske", "sks", "skv", "saoid", "suoid", "scid"),
    *("rscc", "rscd", "rsce", "rscl", "rsct"),
}

_URL = re.compile(r"https?://[^\s'\"<>()\[\]{},]+", re.IGNORECASE)


def _signs(name: str, sas: bool) -> bool:
    name = name.lower()
    return name.startswith(SIGNING_PREFIXES) or name in SIGNING_NAMES or (sas and name in SAS_NAMES)


def unsigned(url: str) -> str:
    """``url`` without its signing query parameters: an http(s) URL's other parameters (``?version=2``),
    in their order, and any other URL, unchanged."""
    if not url.lower().startswith(("http://", "https://")) or "?" not in url:
        return url
    parts = urllib.parse.urlsplit(url)
    pairs = [(urllib.parse.unquote_plus(p.split("=", 1)[0]), p) for p in parts.query.split("&")]
    sas = any(name.lower() == "sig" for name, _ in pairs)
    kept = [raw for name, raw in pairs if not _signs(name, sas)]  # as they were spelled
    if len(kept) == len(pairs):
        return url
    return urllib.parse.urlunsplit(parts._replace(query="&".join(kept)))


def redact(text: str) -> str:
    """``text`` (an error message) with every http(s) URL in it unsigned: an HTTP client's error names the
    URL it was refused, signature and all, and the message goes into the run's summary."""
    return _URL.sub(lambda m: unsigned(m.group(0)), text)


def read_urls(urls: list[str]) -> dict[str, str]:
    """Each shard's identity (``unsigned``) → the URL to read it from, the first of ``urls`` that has it:
    one object signed twice is one shard, cleaned once."""
    reads: dict[str, str] = {}
    for url in urls:
        reads.setdefault(unsigned(url), url)
    return reads
