"""The recognisers behind `detectors`: each takes a text and returns (start, end) spans.

    PhoneFinder(["DE"])("ruf an: 030 1234567")          # [(8, 19)]
    find_secrets("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")

- Phones: Google's libphonenumber (`phonenumbers`): an international number anywhere, a
  national one in the configured regions (`data.pii.regions`), VALID by the country's
  numbering plan; a bare digit run with no separator only after a phone word (call, phone,
  tel, mobile, ...), so order numbers stay. After a phone word or written with +country, a
  number that is only POSSIBLE (the length fits, the block is unassigned or mistyped) counts
  too: it is still someone's personal data.
- Secrets: detect-secrets' plugins (their regexes: AWS, GitHub, GitLab, Slack, Stripe,
  OpenAI, JWT, private keys, PyPI, npm, SendGrid, Twilio, ...), the whole PEM block of a
  private key, an AWS secret access key after its name, and high-entropy tokens by
  detect-secrets' Shannon entropy (detect-secrets itself only scores quoted strings).
- Addresses: a house (or flat) number, capitalised words and a street type (`12 Baker
  Street`, `742 Evergreen Terrace, Springfield, IL 62704`, `Flat 2, Clare Harbor`),
  confirmed by usaddress's parser, and the
  German/Dutch/Scandinavian order (`Hauptstraße 5, 10115 Berlin`).
- Dates of birth, passport and ID numbers: the value's shape only after a context word
  (DOB, born, passport, ID card, ...), so ordinary dates and codes stay.
- IP addresses: dotted quads and full IPv6, except after a version word (`version 2.60.0.1`).
"""

from __future__ import annotations

import functools
import re

DEFAULT_REGIONS = ("US", "GB", "DE")

# ---------------------------------------------------------------- phones

_PHONE_WORD = re.compile(r"(?i)(?:phone|call|tel|telephone|mobile|cell|handy|fax|whatsapp|number|nummer|"
                         r"reach me|text me|ring)\W{0,3}(?:\w+\W{1,3}){0,3}$")


class PhoneFinder:
    """Phone numbers valid in one of `regions` or written with a +country code."""

    def __init__(self, regions):
        self.regions = tuple(dict.fromkeys(r.upper() for r in regions)) or DEFAULT_REGIONS

    def __call__(self, text: str) -> list[tuple[int, int]]:
        import phonenumbers

        if sum(c.isdigit() for c in text) < 7:  # the matcher is slow; most texts hold no phone
            return []
        spans: set[tuple[int, int]] = set()
        for region in self.regions:
            for m in phonenumbers.PhoneNumberMatcher(text, region, leniency=phonenumbers.Leniency.VALID):
                structured = m.raw_string.startswith(("+", "(", "00")) or re.search(r"\d[\s./-]\d", m.raw_string)
                if structured or self._cue(text, m.start):
                    spans.add((m.start, m.end))
        for region in self.regions:  # unassigned or mistyped numbers, where the text says "phone"
            for m in phonenumbers.PhoneNumberMatcher(text, region, leniency=phonenumbers.Leniency.POSSIBLE):
                if sum(c.isdigit() for c in m.raw_string) >= 7 and not any(s < m.end and m.start < e for s, e in spans) \
                        and (m.raw_string.startswith(("+", "(")) or self._cue(text, m.start)):
                    spans.add((m.start, m.end))
        return sorted(spans)

    @staticmethod
    def _cue(text: str, start: int) -> bool:
        return _PHONE_WORD.search(text[max(0, start - 40):start]) is not None

    def __eq__(self, other) -> bool:
        return isinstance(other, PhoneFinder) and other.regions == self.regions

    def __hash__(self) -> int:
        return hash(self.regions)


def valid_region(code: str) -> bool:
    import phonenumbers

    return code.upper() in phonenumbers.SUPPORTED_REGIONS


# ---------------------------------------------------------------- secrets


_SECRET_PLUGINS = ("artifactory", "aws", "azure_storage_key", "basic_auth", "discord", "github_token", "gitlab_token",
                   "jwt", "mailchimp", "npm", "openai", "pypi_token", "sendgrid", "slack", "square_oauth", "stripe",
                   "telegram_token", "twilio")


@functools.lru_cache(maxsize=1)
def _secret_patterns() -> list[re.Pattern]:
    """The regexes of detect-secrets' format plugins (not its keyword or IP plugins, which
    need quotes or are not secrets; high entropy is scored below)."""
    import importlib

    from detect_secrets.plugins.base import RegexBasedDetector

    modules = [importlib.import_module(f"detect_secrets.plugins.{name}") for name in _SECRET_PLUGINS]
    pats = []
    for mod in modules:
        for obj in vars(mod).values():
            if isinstance(obj, type) and issubclass(obj, RegexBasedDetector) and obj is not RegexBasedDetector \
                    and obj.__module__ == mod.__name__:
                pats += list(obj().denylist)
    return pats


# Key shapes detect-secrets lacks or pins to one vendor's exact form: `sk-`/`pk-`/`rk-` keys of
# any length (OpenAI's project keys, Anthropic's, Stripe's test keys), Slack tokens, bare JWTs.
_SHAPES = re.compile(
    r"\b(?:sk|pk|rk)-[A-Za-z0-9_-]{16,}"
    r"|\bgh[pousr]_[A-Za-z0-9]{30,}\b"
    r"|\bxox[abpr]-[A-Za-z0-9-]{10,}"
    r"|\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"
)
_PEM = re.compile(r"-----BEGIN ((?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?)-----.*?(?:-----END \1-----|\Z)", re.S)
_AWS_SECRET = re.compile(r"(?i)(?:aws.{0,20}?secret|secret.{0,5}access.{0,5}key)[^\n]{0,30}?(?<![A-Za-z0-9/+])"
                         r"([A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=])")
_TOKEN = re.compile(r"(?<![\w/+=.-])[A-Za-z0-9][A-Za-z0-9_/+=.-]{18,}[A-Za-z0-9=](?![\w/+=.-])")
_HEX = re.compile(r"^[0-9a-fA-F]+$")


@functools.lru_cache(maxsize=1)
def _entropy():
    from detect_secrets.plugins.high_entropy_strings import Base64HighEntropyString

    return Base64HighEntropyString().calculate_shannon_entropy


def _high_entropy(token: str) -> bool:
    """A random-looking token: 20+ characters mixing upper case, lower case and digits, with
    detect-secrets' Shannon entropy at or above 4.0 bits per character. Hex digests (commit
    ids, checksums) are not secrets; paths and dotted names have few character classes."""
    if _HEX.match(token) or token.count("/") > 2 or token.count(".") > 1:
        return False
    if not (re.search(r"[A-Z]", token) and re.search(r"[a-z]", token) and re.search(r"\d", token)):
        return False
    return _entropy()(token) >= 4.0


def find_secrets(text: str, entropy: bool = True) -> list[tuple[int, int]]:
    """Secrets in a text; `entropy=False` leaves out the high-entropy rule (config values:
    model ids and paths are mixed-case too)."""
    spans = [m.span() for m in _PEM.finditer(text)] + [m.span() for m in _SHAPES.finditer(text)]
    spans += [m.span(1) for m in _AWS_SECRET.finditer(text)]
    for pat in _secret_patterns():
        for m in pat.finditer(text):
            # A group is the secret inside its context (`://user:PASSWORD@`), unless it is
            # only a prefix the plugin captures (GitHub's `ghp`): then the whole match.
            g = next((i for i in range(1, (pat.groups or 0) + 1) if len(m.group(i) or "") >= 8), 0)
            spans.append(m.span(g))
    if entropy:
        spans += [m.span() for m in _TOKEN.finditer(text) if _high_entropy(m.group())]
    return spans


# ---------------------------------------------------------------- addresses

_STREET_TYPES = (
    r"Street|St|Road|Rd|Avenue|Ave|Lane|Ln|Drive|Dr|Boulevard|Blvd|Way|Court|Ct|Place|Pl|Terrace|Ter|Close|"
    r"Crescent|Square|Sq|Highway|Hwy|Parkway|Pkwy|Circle|Cir|Trail|Trl|Row|Mews|Gardens|Grove|Hill|Walk|Park|"
    r"Alley|Plaza|Loop|Pike|Ridge|Run|Path|Point|Crossing|Estates|Heights|Springs|Stream|Village|Ville|Turnpike|"
    r"Expressway|Freeway|Manor|Meadow|Meadows|Station|Bridge|Harbor|Harbour|Island|Junction|Key|Knoll|Landing|"
    r"Lodge|Mill|Mission|Orchard|Pass|Port|Shore|Shores|Summit|Track|Union|Valley|View|Wall|Well|Wells|Creek|"
    r"Falls|Ferry|Field|Fields|Flat|Flats|Ford|Forest|Fork|Forks|Fort|Green|Haven|Hollow|Inlet|Lake|Lakes|Light|"
    r"Lights|Mall|Mount|Mountain|Neck|Oval|Prairie|Radial|Ramp|Ranch|Rapids|Rest|Route|Shoal|Skyway|Spur|Squares|"
    r"Throughway|Trace|Trafficway|Tunnel|Underpass|Vista|Via|Viaduct|Burg|Bypass|Camp|Canyon|Cape|Causeway|Center|"
    r"Centre|Cliff|Club|Common|Corner|Corners|Course|Cove|Dale|Dam|Divide|Extension|Garden|Gateway|Glen|Harbors|"
    r"Bluff|Bottom|Branch|Brook|Beach|Bend|Arcade|Bayou|Crest|Crossroad|Isle|Loaf|Lock|Land|Plain|Pine|Passage|Rue|"
    r"Stravenue|Estate|River|Forge|Curve|Motorway|Overpass|Trailer|Annex"
)  # USPS Publication 28's street suffixes (plurals by the `s?` below), plus British ones
_CAP = r"[A-Z][A-Za-z'\u00c0-\u00ff.-]*"
_UNIT = r"(?:,?\s+(?:Apt\.?|Apartment|Suite|Ste\.?|Unit|Flat|Floor|Fl\.?|Room|#)\s*[A-Za-z0-9-]+)?"
_TAIL = (r"(?:,\s*[A-Z][A-Za-z.'-]*(?:\s[A-Z][A-Za-z.'-]*){0,3}(?:,?\s+[A-Z]{2})?(?:,?\s+\d{5}(?:-\d{4})?)?"
         r"(?:,?\s+[A-Z]{1,2}\d[A-Z\d]?\s?\d[A-Z]{2})?(?=\W|$))?")  # US state + ZIP, or a UK postcode
_US_UK = re.compile(
    rf"(?:(?<![\w-])(?:Flat|Apartment|Studio)\s+\w{{1,5}},?\s+(?:\d{{1,6}}[A-Za-z]?\s+)?|(?<![\w-])\d{{1,6}}[A-Za-z]?\s+)"
    rf"(?:(?:[NSEW]|North|South|East|West)\.?\s+)?(?:{_CAP}\s+){{0,3}}{_CAP}\s+"
    rf"(?:{_STREET_TYPES})s?\b\.?(?:\s+(?:N|S|E|W|NE|NW|SE|SW)\b)?{_UNIT}{_TAIL}"
)
_CONTINENTAL = re.compile(
    r"(?<![\w-])[A-Z\u00c0-\u00de][a-z\u00df-\u00ff]+(?:-[A-Z][a-z\u00df-\u00ff]+)*-?"
    r"(?i:stra(?:ß|ss)e|str\.|weg|platz|allee|gasse|ring|damm|ufer|chaussee|steig|pfad|straat|laan|plein|gracht|"
    r"gatan|gata|vägen|vej|gade)"
    r"\s+\d{1,4}(?:[/-]\d{1,4})?\s?[a-z]?(?:,?\s+\d{4,5}\s+[A-Z\u00c0-\u00de][a-z\u00df-\u00ff]+(?:[ -][A-Z][a-z\u00df-\u00ff]+)?)?"
)


_MILITARY = re.compile(r"\b(?:PSC|CMR|Unit|USNS|USNV|USS|USCGC)\s+[\w ]{1,20}?(?:,?\s+Box\s+\d{1,5})?,\s+"
                       r"(?:APO|FPO|DPO)\s+(?:AA|AE|AP)\s+\d{5}\b")


def _usaddress_ok(candidate: str) -> bool:
    """usaddress's parser agrees the candidate is a street address (a number, a street
    name and its type), not a sentence that happens to hold a number and a capital."""
    import usaddress

    try:
        tagged, kind = usaddress.tag(candidate)
    except usaddress.RepeatedLabelError:
        return True  # several addresses run together: still address-shaped
    return kind == "Street Address" and "StreetName" in tagged and (
        "AddressNumber" in tagged or "OccupancyIdentifier" in tagged)


def find_addresses(text: str) -> list[tuple[int, int]]:
    # usaddress knows US addresses; a UK flat line ("Flat 2, Clare Harbor") is shaped enough.
    spans = [m.span() for m in _US_UK.finditer(text)
             if m.group().startswith(("Flat", "Apartment", "Studio")) or _usaddress_ok(m.group().rstrip(".,"))]
    spans += [m.span() for m in _CONTINENTAL.finditer(text)] + [m.span() for m in _MILITARY.finditer(text)]
    return [(s, e - (len(text[s:e]) - len(text[s:e].rstrip(".,")))) for s, e in spans]


# ---------------------------------------------------------------- context-bound identifiers

_MONTHS = (r"Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|Sep(?:t(?:ember)?)?|"
           r"Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?|Januar|Februar|März|Mai|Juni|Juli|Oktober|Dezember")
_DATE = (rf"(?:\d{{4}}-\d{{1,2}}-\d{{1,2}}|\d{{1,2}}[./-]\d{{1,2}}[./-](?:\d{{4}}|\d{{2}})"
         rf"|\d{{1,2}}(?:st|nd|rd|th)?\.?\s+(?:{_MONTHS})\.?,?\s+\d{{4}}|(?:{_MONTHS})\.?\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{4}})")
_DOB = re.compile(
    rf"(?i)(?:\bd\.?o\.?b\b\.?|date\s+of\s+birth|birth\s*date|birthday|\bborn(?:\s+on)?|geboren(?:\s+am)?|\bgeb\.|"
    rf"geburtsdatum|né(?:e)?\s+le|fecha\s+de\s+nacimiento)\W{{0,12}}({_DATE})(?![\d])"
)
_PASSPORT = re.compile(
    r"(?i)(?:passport|passeport|reisepass|pasaporte|passaporto)(?:\s*(?:no\.?|number|nr\.?|num(?:ber)?|#|nummer|id))?"
    r"(?:\s+is)?[\s:#.]{0,6}(?-i:((?=[A-Z0-9]*\d)[A-Z0-9]{6,9}))(?![A-Za-z0-9])"
)
_ID = re.compile(
    r"(?i)(?:\bid[\s-]*card|national\s+id(?:entity)?(?:\s+card)?|identity\s+card|\bid\s*(?:no\.?|number|#)|personalausweis"
    r"(?:nummer)?|ausweis(?:nummer)?|driver'?s?\s+licen[cs]e(?:\s+(?:no\.?|number|#))?|licen[cs]e\s+(?:no\.?|number)|"
    r"tax\s+id|steuer-?id|national\s+insurance(?:\s+number)?|\bnino\b|\bdni\b|\bnie\b|codice\s+fiscale|\bbsn\b)"
    r"(?:\s+is)?[\s:#.]{0,6}(?-i:((?=[A-Z0-9 -]*\d)[A-Z0-9](?:[A-Z0-9 -]{4,16})[A-Z0-9]))(?![A-Za-z0-9])"
)
_NINO = re.compile(r"\b(?!BG|GB|NK|KN|TN|NT|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D]\b")


def find_dates_of_birth(text: str) -> list[tuple[int, int]]:
    return [m.span(1) for m in _DOB.finditer(text)]


def find_passports(text: str) -> list[tuple[int, int]]:
    return [m.span(1) for m in _PASSPORT.finditer(text)]


def find_id_numbers(text: str) -> list[tuple[int, int]]:
    spans = []
    for m in _ID.finditer(text):
        s, e = m.span(1)
        value = text[s:e].rstrip(" -")
        spans.append((s, s + len(value)))
    return spans + [m.span() for m in _NINO.finditer(text)]


# ---------------------------------------------------------------- IP addresses

_IP = re.compile(
    r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?!\d|\.\d)"
    r"|\b(?:[0-9a-fA-F]{1,4}:){7}[0-9a-fA-F]{1,4}\b"
)
_VERSION_BEFORE = re.compile(r"(?i)(?:\bversion|\bver\.?|\brelease|\bbuild|\bv|\brev(?:ision)?|\bpatch|\bupgrade[ds]?\s+to|"
                             r"\bupdate[ds]?\s+to|==|>=|<=|~=)\s*$")


def find_ip_addresses(text: str) -> list[tuple[int, int]]:
    """Dotted quads and IPv6; a quad right after a version word is a version number."""
    return [m.span() for m in _IP.finditer(text)
            if not _VERSION_BEFORE.search(text[max(0, m.start() - 24):m.start()])]
