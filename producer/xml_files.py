"""`--xml FILE` / `--persistent-xml FILE`: a domain XML read from the operator's file.

Only the reading is here (missing, unreadable, too big, not UTF-8: one line each); what the
XML may say is jobs/domain_xml.py's, checked when the spec is built and again on the workers.
"""

from __future__ import annotations

from pathlib import Path

from jobs.domain_xml import MAX_DOMAIN_XML_CHARS

# UTF-8 takes at most 4 bytes a character: a file over this many bytes cannot be accepted.
MAX_XML_FILE_BYTES = 4 * MAX_DOMAIN_XML_CHARS


class XMLFileError(ValueError):
    """A file that cannot be an XML for drover; one line naming the option and the file."""


def read_xml_file(path: str, option: str) -> str:
    """The text of `path`, or XMLFileError."""
    where = f"{option} {path}"
    try:
        with Path(path).open("rb") as f:
            raw = f.read(MAX_XML_FILE_BYTES + 1)
    except FileNotFoundError:
        raise XMLFileError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise XMLFileError(f"{where}: is a directory") from None
    except OSError as exc:
        raise XMLFileError(f"{where}: cannot read it ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise XMLFileError(f"{where}: not UTF-8 text") from None
    if len(raw) > MAX_XML_FILE_BYTES or len(text) > MAX_DOMAIN_XML_CHARS:
        raise XMLFileError(f"{where}: over {MAX_DOMAIN_XML_CHARS} characters")
    if not text.strip():
        raise XMLFileError(f"{where}: the file is empty")
    return text
