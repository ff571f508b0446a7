"""`drover migrate --xml FILE / --persistent-xml FILE`: the files read into spec fields.

Apart from producer/cli.py so the migrate command stays one screen; reading and checking a
file's form is producer/xml_files.py, the worker checks the XML again against the guest.
"""

from __future__ import annotations

from producer.cli_common import EXIT_USAGE, fail


def xml_request(xml: str | None, persistent_xml: str | None) -> dict[str, str]:
    """The spec fields of --xml / --persistent-xml: the files' text (one line if unreadable)."""
    from producer.xml_files import XMLFileError, read_xml_file

    fields = {}
    try:
        if xml is not None:
            fields["dest_xml"] = read_xml_file(xml, "--xml")
        if persistent_xml is not None:
            fields["persist_xml"] = read_xml_file(persistent_xml, "--persistent-xml")
    except XMLFileError as exc:
        fail(str(exc), EXIT_USAGE)
    return fields
