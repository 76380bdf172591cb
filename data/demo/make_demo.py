#!/usr/bin/env python3
"""Generate the bundled demo dataset: synthetic customer-support messages.

Messages to "Lumora Home", a fictional smart-home company, labelled with one of
six intents. Written by this script alone (standard library, fixed seed, so the
output is byte-identical on every run); no outside data is used.

    python data/demo/make_demo.py              # writes data/demo/train.csv
    python data/demo/make_demo.py --out x.csv  # writes somewhere else
"""

import argparse
import csv
import random
from pathlib import Path

SEED = 20261128

# Rows per class: deliberately imbalanced (largest 37.5 %, smallest 5 %).
CLASS_COUNTS = {"billing": 300, "technical_issue": 165, "shipping": 125,
                "account_access": 120, "refund": 50, "feedback": 40}

HARD_RATE = 0.20     # share of messages whose main sentence comes from HARD
FRAME_RATE = 0.40    # share of messages built from a shared FRAME
SHORT_RATE = 0.12    # chance of a bare one-sentence message
MENTION_RATE = 0.65  # chance (x3) of a remark about a confusable topic
CONTEXT_RATE = 0.35  # chance of one neutral remark (no label cue)
TYPO_RATE = 0.06     # chance of one small typo
MAX_WORDS = 60       # longer candidates are dropped

SLOTS = {
    "product": ["Lumora Hub", "Hub Mini", "Glow Bulb", "Glow Strip", "Cam Mini", "Cam Pro",
                "Doorbell 2", "Smart Plug", "Thermo One", "Motion Sensor", "Door Sensor",
                "Breeze Monitor", "Smart Lock", "Chime Speaker"],
    "plan": ["Plus plan", "Premium plan", "Family plan", "Cloud Video plan", "Basic plan"],
    "device": ["iPhone 13", "iPhone 15", "Pixel 7", "Pixel 8", "Galaxy S23", "Galaxy A54", "iPad",
               "OnePlus 11", "Android tablet", "MacBook", "Windows laptop", "Chromebook"],
    "carrier": ["UPS", "FedEx", "DHL", "USPS", "the courier", "Royal Mail", "DPD"],
    "err": ["E102", "E-45", "0x80f3", "ERR_TIMEOUT", "503", "E7", "SYNC_FAIL", "code 12", "E-208"],
    "days": ["two", "three", "four", "five", "six", "ten", "several"],
    "card": ["Visa", "Mastercard", "Amex", "debit card", "PayPal account", "credit card"],
    "room": ["kitchen", "living room", "garage", "hallway", "bedroom", "office", "porch"],
}
MONTHS = "Jan Feb March April May June July Aug Sept Oct Nov Dec".split()
GREETINGS = ["", "", "", "", "Hi,", "Hello,", "Hi there,", "Hey,", "Good morning,", "Hello team,",
             "Dear support,", "hi", "Hi Lumora,", "Good afternoon,"]
CLOSINGS = ["", "", "", "", "", "Thanks.", "Thank you!", "Thanks in advance.", "Cheers",
            "Regards, Sam", "Please advise.", "thx", "Appreciate the help.", "Kind regards.",
            "Let me know asap.", "Thanks, Priya", "- Marco"]


def sections(block: str) -> dict[str, list[str]]:
    """Parse '## name' headed blocks; templates are separated by newlines or ' | '."""
    out: dict[str, list[str]] = {}
    for line in block.strip().splitlines():
        if line.startswith("## "):
            out[key := line[3:].strip()] = []
        elif line.strip():
            out[key].extend(t.strip() for t in line.split(" | "))
    return out


def frames(block: str) -> list[tuple[str, dict[str, list[str]]]]:
    """Parse '## frame with {cue}' headers followed by 'label: cue | cue' lines."""
    out: list[tuple[str, dict[str, list[str]]]] = []
    for line in block.strip().splitlines():
        if line.startswith("## "):
            out.append((line[3:].strip(), {}))
        else:
            label, cues = line.split(": ", 1)
            out[-1][1].setdefault(label, []).extend(c.strip() for c in cues.split(" | "))
    return out


# Main templates. Many share words on purpose (charge, order, app, login,
# return) so that a classifier has to use combinations, not a single word.
TEMPLATES = sections("""
## billing
I was charged {amount} twice for my {plan} this month. | Is there a student discount on the {plan}?
Why did my bill go up to {amount}? I did not change anything.
Can you send me an invoice for order {order}? | You charged me after I cancelled my subscription.
I need to update the {card} on file for my subscription.
My {card} was declined when renewing the {plan}. | Do you offer yearly billing for the {plan}?
There is a charge of {amount} on {date} that I do not recognise.
How do I switch from the {plan} to the {plan2}? | Can I get a VAT receipt for the {amount} payment?
Please cancel the {plan} before the next billing date.
The price shown in the app was lower than what I paid.
I want to change my billing address. | I am being charged for a {product} camera slot I do not use.
My payment failed but the money still left my account.
The promo code did not apply at checkout and I paid full price for the {product}.
I see two pending payments of {amount}, will one drop off?
Autopay took {amount} from the wrong {card}. | Subscription renewed without warning, {amount} gone.
## technical_issue
My {product} keeps disconnecting from wifi. | The app freezes on the loading screen on my {device}.
The app crashes every time I open the {product} settings on my {device}.
{product} shows error {err} and will not pair. | Firmware update is stuck at 60 % on my {product}.
The {product} in the {room} stopped responding after the update.
The live view on the {product} is black, only audio works.
Motion alerts from the {product} arrive {days} minutes late.
I reset the {product} but it still blinks red. | Voice assistant cannot find my {product} anymore.
The app says device offline although the {product} is plugged in.
Scenes and automations stopped running since {date}.
The {product} battery drains in {days} days, is that normal?
Cannot add the {product} to the hub, it times out with {err}.
Recordings from the {product} are missing for {date}.
Temperature reading on the {product} is off by {days} degrees.
Notifications stopped working after I updated my {device}.
The app shows {err} when I try to load the camera history.
## shipping
Where is my order {order}? It was supposed to arrive on {date}.
Tracking for {order} has not updated in {days} days.
{carrier} says delivered but there is no package.
Can I change the delivery address for order {order}?
The box arrived damaged, the {product} inside rattles.
Do you ship to Canada? | My order {order} only had the {product}, the {product2} is missing.
Wrong item in my parcel, I got a {product} instead of a {product2}. | Has my {product} shipped yet?
How long does standard delivery take? | The tracking link in the email for {order} does not work.
The package was sent back to you by {carrier}, can you resend it? | My parcel is stuck in customs.
Order {order} still says processing after {days} days.
{carrier} left a note but I was home all day. | Can you hold my shipment until I am back on {date}?
I ordered express shipping but it came standard.
Is there a way to get order {order} before {date}?
## account_access
I cannot log in, it says my password is wrong. | How do I change the email address on my account?
The reset password email never arrives. | Someone else logged into my account from another country.
My account got locked after too many login attempts.
I lost my phone and cannot get the two-factor code.
The app logs me out every time I close it on my {device}. | How do I add a second user to our home?
I made two accounts by mistake, can you merge them?
The verification code from the app is always invalid.
I want to delete my Lumora account and all my data.
My wife cannot accept the invite to share the home.
Sign in with Apple gives error {err}. | I no longer have access to the email I signed up with.
Login page just reloads on my {device}. | I got a new {device} and now my account shows no devices.
The app says my account does not exist but I have used it for years.
Can't sign in after changing my password yesterday.
## refund
I returned the {product} on {date} and still have not been refunded.
I want my money back for order {order}. | Please refund the {amount} for the {product} I sent back.
How long does a refund take to show on my {card}?
The refund for order {order} was less than what I paid.
Can I return the {product} for a full refund? It is within 30 days.
You promised a refund of {amount} but nothing arrived.
I cancelled order {order} before it shipped, where is my money?
Refund status for {order} still says pending. | Return request for the {product} was rejected, why?
The {product} does not fit our door, I would like to return it and get my money back.
I sent the return label package back {days} weeks ago, no refund yet.
Can the refund go to a different {card}? The old one is closed.
I was told I would get a partial refund for the late delivery.
Please reverse the charge for the {product}, I never wanted it.
Is shipping refunded too when I return the {product}?
## feedback
Just wanted to say the {product} works great, thanks! | Your support agent was very helpful today.
It would be nice if the app had a dark mode. | Love the {product}, setup took five minutes.
Please add support for more voice assistants. | Great product but the manual could be clearer.
The new app design is confusing, I liked the old one better.
Suggestion: let us schedule the {product} by sunrise.
The packaging for the {product} was nice and easy to recycle.
I think the {plan} is too expensive for what it offers.
Would be great to have a widget for the {product} on {device}.
Five stars for the {product}, recommending it to friends.
Delivery was fast and the {product} looks great in the {room}.
Not a complaint, just an idea: group devices by room.
The {product} colours are lovely, please make a warmer white.
Your last update made the app much faster, well done.
""")

# Hard cases: the cue is subtle or the message touches another topic, but the
# label is still the right one for what the customer actually asks for.
HARD = sections("""
## billing
The app says my {plan} expired but I paid on {date}.
I got an email about a failed payment, is my camera still recording?
My order {order} confirmation shows {amount}, the site said less.
Do I still pay for the {plan} if I return the {product}? | I cannot log in to download my invoice.
Charged {amount} again for the {product} subscription, I thought it was included.
Why is there a second charge from Lumora on my {card}? | Money was taken on {date}, what is it for?
The app keeps asking me to update my payment details.
## technical_issue
After the app update I cannot see my {product} even though I am logged in.
The {product} I just received will not turn on.
The {product} from order {order} keeps showing {err}.
Is the {plan} needed for the camera to work? It stopped recording.
New {product} arrived today and it does not connect.
The app shows {err} every time, I already tried logging out.
Half the time the {product} does nothing when I tap it in the app.
I paid for the {plan} but the cloud clips do not load.
Replacement {product} has the same problem as the one I returned.
## shipping
I paid for next-day delivery on order {order} and it is still not here.
The app says my {product} is on its way but no tracking.
Bought a {product} on {date}, nothing received.
I was charged for order {order}, when does it go out?
Still waiting for my {product}. | Payment went through {days} days ago and the order has not moved.
The replacement {product} you promised has not arrived yet.
Order {order} shows returned to sender, I never refused it.
## account_access
The app shows {err} right after I type my email.
I cannot see my {plan} because the app will not let me in.
My {product} works but the app keeps asking me to sign in again.
Got a security email I did not expect, was it me?
The app does not accept my code, I cannot get to my {product}.
I paid for the {plan} but I cannot get into the account it is on.
Since the update the app says session expired every few minutes.
The {product} is online but I only see an empty home after signing in.
## refund
Can I get the {amount} back? The {product} arrived broken.
Charged twice for order {order}, please send one back.
Order {order} never arrived, I just want my money returned.
The {product} stopped working after a week, I would rather have my money than a replacement.
I cancelled the {plan} on day one, can I have that {amount} returned?
Still waiting for my money for the {product}.
The charge for the {product} I sent back is still on my {card}.
Your app error meant I paid {amount} for nothing, I want it back.
I was charged but the order was cancelled, will the charge be removed?
## feedback
The app is fine but logging in every day is annoying.
Delivery took long but the {product} is worth the wait.
The {plan} price is a bit high, otherwise happy.
Honestly the {product} setup could be simpler for older people.
The app keeps changing, please stop moving the buttons.
Would love to be able to pay for the {plan} yearly.
Shipping updates by text message would be a nice touch.
The {product} is good but the app could show more history.
""")

# Shared frames: one sentence shape for several classes; only the short cue
# phrase ("label: cue | cue") decides the label.
FRAMES = frames("""
## I was charged {amount} for order {order} and {cue}
billing: the invoice shows a different amount. | I need a proper invoice for it.
billing: it was billed to the wrong {card}. | then charged again a day later.
refund: I want that money back. | I returned it, please refund me. | I cancelled, reimburse me.
shipping: it still has not shipped. | the parcel has not arrived. | the tracking shows nothing.
feedback: honestly checkout was really smooth. | the price felt fair, good job.
## Since the latest app update on my {device}, {cue}
technical_issue: the {product} no longer shows live video. | the {product} will not pair.
technical_issue: my automations do not run. | the {product} shows {err}.
account_access: I cannot sign in at all. | it rejects my password. | the 2FA code never works.
billing: it says I owe {amount} for the {plan}. | my subscription is listed as unpaid.
feedback: everything feels faster, nice work. | I cannot find the room view, please bring it back.
## About the {product} from order {order}: {cue}
shipping: it has not been delivered. | {carrier} lost it. | it went to my old address.
refund: I sent it back and want my money. | please refund it, not what I expected.
technical_issue: it will not connect to wifi. | it shows error {err}.
feedback: it looks great, thanks. | the setup guide was excellent.
billing: I need the receipt for my expenses. | the tax on the invoice looks wrong.
## I contacted you on {date} about {cue} and still nothing.
refund: my refund | the money for my return
shipping: my missing parcel | the delivery of order {order}
billing: the double charge | my invoice | the price increase
account_access: my locked account | the login problem
technical_issue: the {product} going offline | error {err}
## My {plan} account {cue}
account_access: is locked, the reset link fails. | was hacked, the email is not mine.
billing: was billed {amount} instead of the usual price. | shows two active subscriptions.
technical_issue: is fine but the {product} will not stream. | works but clips never upload.
feedback: is great value, keep it up. | should include more cloud days.
""")

# Background remarks. Each class gets remarks that use the vocabulary of the
# classes it is easily confused with, including negated ones ("login works").
MENTIONS = sections("""
## money
I paid {amount} with my {card}. | My bank shows {amount} from you. | I am on the {plan}.
The {amount} payment went through on {date}. | The refund for my last order went fine.
I was charged for it on {date}.
## order
I ordered it on {date}. | I bought it together with a {product2}. | The delivery itself was quick.
The order number is {order}. | It came with {carrier}. | The box arrived on {date}.
## app
I use the app on my {device}. | I reinstalled the app already. | The app is up to date.
The app showed {err} once. | I already logged out and back in. | My password is saved in the app.
## return
I still have the box if I need to send it back. | I returned a {product2} before, that was easy.
I do not want to send it back if I can avoid it.
## neutral
I have been a customer for {days} years. | Not sure if this is the right place to ask.
This is my second message about this. | My partner also uses the account.
I set everything up in the {room} last week. | We have a few {product} devices in the house.
I am writing from my {device}. | I already checked the help pages. | I would prefer an email reply.
It is for the {product} we bought for my parents. | Your chat was closed so I am emailing instead.
## no_billing
The billing side is fine. | My invoice is correct. | The payment itself went through fine.
## no_refund
I do not want a refund. | No refund needed. | I am not asking for my money back.
## no_shipping
Delivery was on time. | The parcel arrived fine. | Shipping was quick.
## no_tech
The {product} itself works fine. | No errors in the app. | The device is working.
## no_account
I can log in fine. | My login works. | The account itself is fine.
## praise
Otherwise I love the {product}. | Your products are usually great. | Not angry, just confused.
""")
CONFUSABLE = {  # topics of remarks; "no_x" = saying what the problem is *not*
    "billing": ["order", "return", "app", "no_refund", "no_tech", "no_account"],
    "refund": ["app", "order", "praise", "no_billing", "no_shipping", "no_tech"],
    "technical_issue": ["money", "order", "return", "praise", "no_account", "no_shipping",
                        "no_billing"],
    "shipping": ["money", "app", "return", "praise", "no_refund", "no_billing"],
    "account_access": ["money", "order", "praise", "no_tech", "no_billing"],
    "feedback": ["money", "order", "app", "return", "no_tech", "no_shipping", "no_refund"],
}


def fill(template: str, rng: random.Random) -> str:
    vals = {k: rng.choice(v) for k, v in SLOTS.items()}
    vals.update(product2=rng.choice(SLOTS["product"]), plan2=rng.choice(SLOTS["plan"]))
    vals["order"] = rng.choice(["#", "LH-", "", "#LH"]) + str(rng.randint(100000, 999999))
    cur, cents = rng.choice(["$", "$", "£", "€"]), rng.choice(["00", "99", "49", "95"])
    vals["amount"] = f"{cur}{rng.randint(3, 249)}.{cents}"
    d, m = rng.randint(1, 28), rng.choice(MONTHS)
    nth = {1: "st", 2: "nd", 3: "rd", 21: "st", 22: "nd", 23: "rd"}.get(d, "th")
    vals["date"] = rng.choice([f"{m} {d}", f"{d} {m}", f"{m} {d}", "Monday", "Friday",
                               "Tuesday", f"the {d}{nth}", f"{d}/{rng.randint(1, 12)}"])
    return template.format(**vals)


def typo(text: str, rng: random.Random) -> str:
    """Swap, drop or double one letter inside one longer word."""
    words = text.split(" ")
    idx = [i for i, w in enumerate(words) if w.isalpha() and len(w) > 4]
    if not idx:
        return text
    i = rng.choice(idx)
    w, j = words[i], rng.randrange(1, len(words[i]) - 1)
    words[i] = rng.choice([w[:j] + w[j + 1] + w[j] + w[j + 2:],  # swap two letters
                           w[:j] + w[j + 1:], w[:j] + w[j] + w[j:]])  # drop / double one
    return " ".join(words)


def style(text: str, rng: random.Random) -> str:
    """Occasionally all lower case, no final punctuation, or (if short) shouting."""
    r = rng.random()
    if r < 0.08:
        return text.lower()
    if r < 0.12:
        return text.rstrip(".!?")
    return text.upper() if r < 0.14 and len(text) < 60 else text


def message(label: str, rng: random.Random) -> str:
    r = rng.random()
    if r < FRAME_RATE:
        frame, cues = rng.choice([f for f in FRAMES if label in f[1]])
        template = frame.replace("{cue}", rng.choice(cues[label]))
    elif r < FRAME_RATE + HARD_RATE:
        template = rng.choice(HARD[label])
    else:
        template = rng.choice(TEMPLATES[label])
    parts = [fill(template, rng)]
    if rng.random() < SHORT_RATE:  # terse one-liner, no extras
        return style(parts[0], rng)
    n_mentions = sum(rng.random() < MENTION_RATE for _ in range(3))
    topics = CONFUSABLE[label]
    for topic in rng.sample(topics, min(n_mentions, len(topics))):
        parts.insert(rng.randrange(len(parts) + 1), fill(rng.choice(MENTIONS[topic]), rng))
    if rng.random() < CONTEXT_RATE:
        parts.insert(rng.randrange(len(parts) + 1), fill(rng.choice(MENTIONS["neutral"]), rng))
    text = " ".join(p for p in [rng.choice(GREETINGS), *parts, rng.choice(CLOSINGS)] if p)
    if rng.random() < TYPO_RATE:
        text = typo(text, rng)
    return style(text, rng)


def generate(seed: int = SEED) -> list[tuple[str, str]]:
    """Return shuffled (text, label) rows; texts are unique and <= MAX_WORDS."""
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[tuple[str, str]] = []
    for label, n in CLASS_COUNTS.items():
        made = 0
        while made < n:
            text = message(label, rng)
            if text not in seen and len(text.split()) <= MAX_WORDS:
                seen.add(text)
                rows.append((text, label))
                made += 1
    rng.shuffle(rows)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "train.csv")
    args = ap.parse_args()
    rows = generate()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
