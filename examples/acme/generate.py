"""Writes the Acme sample corpus (deterministic; the outputs are committed beside this file).

    python examples/acme/generate.py

Acme Rockets & Anvils is fictional, and so is every person, e-mail address, phone number,
card number and IBAN below (card numbers are the well-known test numbers). The corpus has
three formats in three source types, and is deliberately imperfect so the data stage's
quarantine, dedup and redaction have work to do:

    faq.csv                 instruction: question, answer, category (~150 rows)
    support_chats.jsonl     chat: OpenAI-style messages (~120 conversations), fake PII
    handbook/*.md           completion: one handbook page per file (~20 pages)
    heldout.jsonl           not training data: one paraphrased question per fact, with the
                            fact as its reference (the quickstart's held-out questions)

Broken on purpose: invalid JSON lines, a non-UTF-8 line and file, a conversation in the
wrong turn order, an empty answer, a CSV row with too many fields, a missing answer,
exact duplicates.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
rng = random.Random(2026)

# (topic, fact, question phrasings)
FACTS = [
    ("hours", "Acme offices are open Monday to Friday, 8:30 to 17:30.",
     ["What are Acme's office hours?", "When is the Acme office open?", "What time does the office open and close?"]),
    ("vacation", "Every Acme employee gets 27 vacation days per year.",
     ["How many vacation days do Acme employees get?", "How much annual leave do I have?", "What is the vacation allowance at Acme?"]),
    ("travel", "Travel expenses are approved by your team lead, then by finance.",
     ["Who approves travel expenses?", "How do I get a trip approved?", "Who signs off on travel costs?"]),
    ("password", "Reset your password in the Acme portal with 'Forgot password' and follow the e-mail link.",
     ["How do I reset my Acme password?", "I forgot my password, what now?", "Where can I change a lost password?"]),
    ("helpdesk", "The help desk is on the second floor, room 204, open 8:00 to 18:00.",
     ["Where is the help desk?", "How do I find IT support in the building?", "Which room is the help desk in?"]),
    ("remote", "Employees may work remotely up to three days per week after their first month.",
     ["What is Acme's remote work policy?", "How many days can I work from home?", "Can I work remotely at Acme?"]),
    ("payday", "Acme pays salaries on the 25th of every month, or the Friday before if it falls on a weekend.",
     ["When is payday at Acme?", "On which day are salaries paid?", "When do I get paid?"]),
    ("rooms", "Book meeting rooms in the Acme calendar under 'Rooms'; rooms hold up to 12 people.",
     ["How do I book a meeting room?", "Where do I reserve a conference room?", "How big are the meeting rooms?"]),
    ("parental", "Acme offers 16 weeks of paid parental leave to every parent.",
     ["How long is parental leave at Acme?", "Is parental leave paid?", "What does Acme's parental leave cover?"]),
    ("laptop", "New engineers get a 14-inch laptop with 32 GB of memory; others get a 13-inch model.",
     ["Which laptop do new engineers get?", "What computer will I receive?", "How much memory do Acme laptops have?"]),
    ("security", "Report security incidents at once to the security team through the portal or extension 999.",
     ["How do I report a security incident?", "Who do I call about a phishing e-mail?", "What is the security hotline?"]),
    ("training", "Acme pays up to 2000 euros per year for approved training courses.",
     ["Does Acme pay for training?", "What is the training budget?", "Can I get a course reimbursed?"]),
    ("rocket-x1", "The X1 rocket carries 40 kg to low orbit and ships with a two-year warranty.",
     ["What can the X1 rocket carry?", "What is the X1's payload?", "How long is the X1 warranty?"]),
    ("anvil-pro", "The Anvil Pro weighs 75 kg, is forged steel and is guaranteed not to bounce.",
     ["How heavy is the Anvil Pro?", "What is the Anvil Pro made of?", "Does the Anvil Pro bounce?"]),
    ("springs", "Acme springs come in sizes S, M and L; size L stores 3 kJ when fully compressed.",
     ["Which sizes do Acme springs come in?", "How much energy does an L spring store?", "What spring sizes exist?"]),
    ("returns", "Products can be returned within 30 days with the order number; refunds take 5 working days.",
     ["What is the return policy?", "How long do refunds take?", "Can I return a product?"]),
    ("shipping", "Standard shipping takes 3 to 5 working days; express shipping arrives the next day.",
     ["How long does shipping take?", "Is there express delivery?", "When will my order arrive?"]),
    ("warranty", "Warranty claims go through the portal's 'Claims' page with a photo of the defect.",
     ["How do I make a warranty claim?", "Where do I file a claim?", "What do I need for a warranty claim?"]),
    ("canteen", "The canteen on the ground floor serves lunch from 11:30 to 14:00.",
     ["When is lunch served?", "Where is the canteen?", "What are the canteen hours?"]),
    ("parking", "Employees park free in garage B; visitors get a ticket at reception.",
     ["Where can I park?", "Is parking free for employees?", "Where do visitors park?"]),
    ("onboarding", "New hires spend their first week in onboarding, starting Monday 9:00 at reception.",
     ["What happens in my first week?", "When does onboarding start?", "Where do new hires go on day one?"]),
    ("expenses", "Submit expenses in the portal within 60 days with receipts attached.",
     ["How do I submit expenses?", "What is the deadline for expense claims?", "Do I need receipts for expenses?"]),
    ("sick", "Report sick leave to your team lead before 9:00; a doctor's note is needed after 3 days.",
     ["What do I do when I am sick?", "When do I need a doctor's note?", "How do I report sick leave?"]),
    ("vpn", "Use the Acme VPN for remote access; install it from the portal's software page.",
     ["How do I connect from home?", "Where do I get the VPN?", "How does remote access work?"]),
    ("badges", "Lost badges are replaced at reception for a 10 euro fee.",
     ["I lost my badge, what now?", "How much does a new badge cost?", "Where do I replace my badge?"]),
    ("wifi", "The guest Wi-Fi is 'Acme-Guest'; the password changes every Monday and is shown at reception.",
     ["What is the guest Wi-Fi?", "Where do I find the Wi-Fi password?", "How do visitors get online?"]),
    ("recycling", "Old anvils are recycled for free; bring them to the loading dock on Thursdays.",
     ["How do I recycle an old anvil?", "Does Acme take back old products?", "When can I drop off anvils?"]),
    ("pension", "Acme matches pension contributions up to 5 percent of salary.",
     ["Does Acme match pension contributions?", "What is the pension match?", "How much does Acme add to my pension?"]),
    ("bikes", "Acme leases bicycles to employees through a salary-sacrifice scheme.",
     ["Can I lease a bike through Acme?", "Is there a bike scheme?", "How does the bicycle lease work?"]),
    ("ceo", "Acme's chief executive holds an open question hour on the first Tuesday of every month.",
     ["When can I ask the CEO questions?", "Is there a town hall?", "When is the open question hour?"]),
]

# One paraphrase per fact, in none of the corpus's phrasings: heldout.jsonl, the questions the
# quickstart's summary and `raylab eval --input examples/acme/heldout.jsonl` score (ROUGE-L
# against the fact). Vacation first: the summary's headline.
HELD_OUT = {
    "vacation": "How many days off do I get each year?",
    "hours": "From what time to what time is the Acme office open?",
    "travel": "Who has to approve my business trip costs?",
    "password": "My Acme password stopped working, how can I set a new one?",
    "helpdesk": "Where can I find the IT help desk?",
    "remote": "How often am I allowed to work from home?",
    "payday": "Which day of the month is salary paid?",
    "rooms": "How can I reserve a room for a meeting?",
    "parental": "How many weeks of parental leave does Acme give?",
    "laptop": "What laptop will a new engineer receive?",
    "security": "Who should I tell about a security incident?",
    "training": "How much will Acme pay for my training courses?",
    "rocket-x1": "How much payload does the X1 rocket carry to orbit?",
    "anvil-pro": "What is the weight of the Anvil Pro?",
    "springs": "What sizes are Acme springs sold in?",
    "returns": "How long do I have to return a product?",
    "shipping": "How long does standard shipping take?",
    "warranty": "How do I file a warranty claim for a defect?",
    "canteen": "At what time does the canteen serve lunch?",
    "parking": "Where do employees park?",
    "onboarding": "What do new hires do in their first week?",
    "expenses": "How long do I have to submit my expenses?",
    "sick": "Who do I tell when I am sick?",
    "vpn": "How do I get remote access to the Acme network?",
    "badges": "What does it cost to replace a lost badge?",
    "wifi": "What is the Wi-Fi network for guests?",
    "recycling": "Where can I bring an old anvil for recycling?",
    "pension": "Does Acme add to my pension contributions?",
    "bikes": "Can employees lease a bicycle from Acme?",
    "ceo": "When does the chief executive hold the open question hour?",
}

NAMES = ["Alex Morgan", "Sam Rivera", "Jordan Lee", "Taylor Brooks", "Casey Kim", "Riley Chen", "Jamie Novak",
         "Robin Patel", "Chris Okafor", "Dana Fischer"]
PII = [
    lambda n: f"my e-mail is {n.split()[0].lower()}.{n.split()[1].lower()}@example.com",
    lambda n: f"you can call me on +1 415 555 01{rng.randint(10, 99)}",
    lambda n: "my card is 4111 1111 1111 1111",
    lambda n: "please refund to IBAN DE89 3704 0044 0532 0130 00",
    lambda n: f"my order came from IP 203.0.113.{rng.randint(1, 254)}",
    lambda n: "the old API key was sk-test4f9a8b7c6d5e4f3a2b1c",
]


def faq_rows() -> list[list[str]]:
    rows = [[q, fact, topic] for topic, fact, questions in FACTS for q in questions]
    extra = []
    for topic, fact, questions in FACTS:  # a second answer style, so the FAQ reaches ~150 rows
        for q in questions[:2]:
            extra.append([f"Quick question: {q[0].lower()}{q[1:]}", f"Short answer: {fact}", topic])
    rows += extra[:60]
    rows.append(rows[0])  # exact duplicate
    rows.append(rows[5])  # exact duplicate
    rng.shuffle(rows)
    return rows


def write_faq() -> None:
    with open(HERE / "faq.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["question", "answer", "category"])
        for row in faq_rows():
            w.writerow(row)
        w.writerow(["Who is the mascot?", "", "misc"])  # empty answer -> empty_text
    with open(HERE / "faq.csv", "a", encoding="utf-8") as f:
        f.write("Where is the museum?,Top floor,misc,extra field\n")  # invalid_csv


def chat(user: str, answer: str, name: str, with_pii: bool) -> dict:
    opener = f"Hi, this is {name}. {user}"
    if with_pii:
        opener += f" Also, {rng.choice(PII)(name)}."
    messages = [
        {"role": "system", "content": "You are Acme's support assistant. Answer from Acme's policies."},
        {"role": "user", "content": opener},
        {"role": "assistant", "content": answer},
    ]
    if rng.random() < 0.3:
        messages += [{"role": "user", "content": "Thanks! Anything else I should know?"},
                     {"role": "assistant", "content": "If anything is unclear, the help desk in room 204 is happy to help."}]
    return {"id": None, "messages": messages}


def write_chats() -> None:
    lines = []
    for i in range(118):
        topic, fact, questions = FACTS[i % len(FACTS)]
        record = chat(rng.choice(questions), fact, rng.choice(NAMES), with_pii=i % 3 == 0)
        record["id"] = f"chat-{i:04d}"
        lines.append(json.dumps(record, ensure_ascii=False).encode())
    lines.insert(17, b'{"id": "chat-broken-1", "messages": [{"role": "user", "content": "unterminated')
    lines.insert(42, b'{"id": "chat-broken-2" "messages": []}')
    lines.insert(63, '{"id": "chat-latin1", "messages": [{"role": "user", "content": "caf\u00e9"}]}'.encode("latin-1"))
    wrong_order = {"id": "chat-order", "messages": [{"role": "assistant", "content": "Hello!"},
                                                    {"role": "user", "content": "Hi."}]}
    empty_answer = {"id": "chat-empty", "messages": [{"role": "user", "content": "Payday?"},
                                                     {"role": "assistant", "content": "   "}]}
    lines += [json.dumps(wrong_order).encode(), json.dumps(empty_answer).encode()]
    (HERE / "support_chats.jsonl").write_bytes(b"\n".join(lines) + b"\n")


def write_handbook() -> None:
    pages = HERE / "handbook"
    pages.mkdir(exist_ok=True)
    for old in pages.glob("*"):
        old.unlink()
    by_topic: dict[str, list[str]] = {}
    for topic, fact, _ in FACTS:
        by_topic.setdefault(topic.split("-")[0], []).append(fact)
    sections = list(by_topic.items())
    for i in range(0, len(sections), 2):
        chunk = sections[i:i + 2]
        title = " and ".join(t.capitalize() for t, _ in chunk)
        body = "\n\n".join(f"## {t.capitalize()}\n\n" + " ".join(facts) for t, facts in chunk)
        (pages / f"{i // 2 + 1:02d}-{chunk[0][0]}.md").write_text(f"# {title}\n\n{body}\n", encoding="utf-8")
    (pages / "99-legacy.md").write_bytes("# Legacy page\n\nCaf\u00e9 opening hours: see canteen.\n".encode("latin-1"))


def write_heldout() -> None:
    facts = {topic: fact for topic, fact, _ in FACTS}
    lines = [json.dumps({"id": f"heldout-{t}", "messages": [{"role": "user", "content": q}], "reference": facts[t]})
             for t, q in HELD_OUT.items()]
    (HERE / "heldout.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    write_faq()
    write_chats()
    write_handbook()
    write_heldout()
    print("wrote", *sorted(p.name for p in HERE.iterdir() if p.name != "generate.py"))
