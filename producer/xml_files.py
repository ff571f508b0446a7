"""`--xml FILE` / `--persistent-xml FILE`: a domain XML read from the operator's file.

Only the reading is here (an empty path, missing, not a regular file, unreadable, too big,
not UTF-8: one line each); what the XML may say is jobs/domain_xml.py's, checked when the
spec is built and again on the workers.
"""

from __future__ import annotations

from config.addresses import shown
from config.user_files import UserFileError, read_bytes
from jobs.domain_xml import MAX_DOMAIN_XML_CHARS

# UTF-8 takes at most 4 bytes a character: a file over this many bytes cannot be accepted.
MAX_XML_FILE_BYTES = 4 * MAX_DOMAIN_XML_CHARS


class XMLFileError(ValueError):
    """A file that cannot be an XML for drover; one line naming the option and the file."""


def read_xml_file(path: str, option: str) -> str:
    """The text of `path`, or XMLFileError.

    Only a regular file is opened (config/user_files.py): a FIFO would block the command.
    """
    where = f"{option} {shown(path)}" if path else option
    try:
        raw = read_bytes(path, MAX_XML_FILE_BYTES)
    except UserFileError as exc:  # an empty path, missing, a directory, a FIFO, unreadable
        raise XMLFileError(f"{where}: {exc}") from None
    # Over the bytes limit first: a cut at the limit may split a character.
    if len(raw) > MAX_XML_FILE_BYTES:
        raise XMLFileError(f"{where}: over {MAX_DOMAIN_XML_CHARS} characters")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise XMLFileError(f"{where}: not UTF-8 text") from None
    if len(text) > MAX_DOMAIN_XML_CHARS:
        raise XMLFileError(f"{where}: over {MAX_DOMAIN_XML_CHARS} characters")
    if not text.strip():
        raise XMLFileError(f"{where}: the file is empty")
    return text
