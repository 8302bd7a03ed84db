"""The memory benchmark's conversations: long, multi-session, English and Chinese.

Each conversation is a few hundred user turns of everyday filler (work, food,
weather, plans, family) with facts planted at known turns, and one question
per fact that paraphrases it rather than repeating it ("my sister moved to
Tainan last spring" … "where does my sister live now?"). Some facts span two
turns (the dog, then its name). Values (cities, names, numbers) differ per
conversation, and the filler reuses the facts' vocabulary on purpose, so a
question's words also match turns that don't answer it.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass, field

TURNS = 320  # user turns per conversation (each gets a reply: 640 messages)
FACTS_PER_CONVERSATION = 9


@dataclass(frozen=True)
class Fact:
    texts: tuple[str, ...]  # the user turns that hold it (one or two, consecutive)
    question: str


@dataclass
class Conversation:
    lang: str  # "en" or "zh"
    user_id: str
    turns: list[str] = field(default_factory=list)  # user messages, in order
    planted: dict[int, int] = field(default_factory=dict)  # turn index → fact index
    facts: list[Fact] = field(default_factory=list)


# -- English

EN_CITIES = ["Tainan", "Lisbon", "Denver", "Osaka", "Porto", "Leeds", "Austin", "Gdansk"]
EN_NAMES = ["Lily", "Noah", "Ava", "Leo", "Mia", "Ethan", "Zoe", "Owen"]
EN_DOGS = ["Mochi", "Biscuit", "Pepper", "Waffles", "Tofu", "Maple", "Ziggy", "Nori"]
EN_BANDS = ["Radiohead", "Coldplay", "Arcade Fire", "The National", "Muse", "Portishead"]
EN_PLACES = ["Kyoto", "Reykjavik", "Hanoi", "Marrakesh", "Tallinn", "Cusco"]


def en_facts(r: random.Random) -> list[Fact]:
    city, kid, dog = r.choice(EN_CITIES), r.choice(EN_NAMES), r.choice(EN_DOGS)
    code = r.randint(1000, 9999)
    band, place = r.choice(EN_BANDS), r.choice(EN_PLACES)
    rent = r.choice([1450, 1600, 1800, 2100])
    return [
        Fact((f"By the way, my sister moved to {city} last spring.",),
             "Where does my sister live now?"),
        Fact(("I finally adopted a dog from the shelter, a little shiba inu.",
              f"We decided to call him {dog}."),
             "What did we name the puppy I got?"),
        Fact((f"Note to self: the garage door code is {code}.",),
             "What was the code for the garage again?"),
        Fact(("I'm allergic to peanuts, so I always check the labels.",),
             "Which food am I allergic to?"),
        Fact((f"My daughter {kid} starts kindergarten in September.",),
             f"When does {kid} begin school?"),
        Fact(("I switched jobs: I'm now a data engineer at a logistics company.",),
             "What's my job these days?"),
        Fact((f"My favourite band is {band}; I saw them live in 2017.",),
             "Which group do I like the most?"),
        Fact((f"We booked a trip to {place} for the first week of April.",),
             "Where are we going on our trip in April?"),
        Fact((f"My landlord just raised the rent to {rent} a month.",),
             "How much rent am I paying now?"),
    ]


EN_FILLER = [
    "Can you suggest a quick {dish} recipe for {day} dinner?",
    "Work was {adj} today; my manager asked about the {project} project again.",
    "The weather here is {weather} this week, so I stayed in and read.",
    "I'm thinking about learning {skill} in the evenings. Any tips to start?",
    "My sister called me about {topic}; we talked for an hour.",
    "What's a good way to plan a {length} weekend trip on a budget?",
    "I watched {movie} last night. What did you think of the ending?",
    "Remind me how to make my morning routine less rushed.",
    "Our team lunch was at a {cuisine} place; the food was {adj}.",
    "I need a gift idea for a friend who likes {hobby}.",
    "How do I keep my plants alive when I'm away for a week?",
    "My code review at work took forever today because of {topic}.",
    "The kids want a pet, but I'm not sure we have the time.",
    "Any ideas for a {dish} that doesn't take more than twenty minutes?",
    "I went running in the park this {daypart}; it felt {adj}.",
    "Do you think I should repaint the living room {colour}?",
    "I'm reading a book about {topic}; it's {adj} so far.",
    "Traffic was {adj} on the way home, I was late for dinner again.",
    "My car needs new tyres soon; what should I look for?",
    "What's the difference between a {thing} and a {thing2}?",
    "Can you help me write a short note to my neighbour about {topic}?",
    "I had a {adj} conversation with my mom about the holidays.",
    "We might rent a bigger apartment next year. What should I check?",
    "I'm trying to drink less coffee; any alternatives for the {daypart}?",
]
EN_SLOTS = {
    "dish": ["pasta", "curry", "soup", "salad", "stir-fry", "omelette", "risotto"],
    "day": ["Monday", "Tuesday", "Friday", "Sunday"],
    "adj": ["exhausting", "fine", "busy", "great", "weird", "slow", "lovely"],
    "project": ["billing", "migration", "dashboard", "search", "onboarding"],
    "weather": ["rainy", "cold", "hot", "windy", "grey"],
    "skill": ["Spanish", "drawing", "chess", "photography", "the guitar"],
    "topic": ["taxes", "her new job", "the wedding", "a leaking pipe", "history",
              "sleep", "our parents", "the school schedule"],
    "length": ["long", "short", "three-day"],
    "movie": ["a documentary", "an old western", "a sci-fi film", "a comedy"],
    "cuisine": ["Thai", "Mexican", "Italian", "Korean", "Greek"],
    "hobby": ["hiking", "board games", "baking", "gardening", "music"],
    "daypart": ["morning", "afternoon", "evening"],
    "colour": ["green", "white", "blue", "yellow"],
    "thing": ["latte", "router", "mortgage", "virus", "sonnet"],
    "thing2": ["flat white", "modem", "loan", "bacterium", "haiku"],
}

# -- Chinese (Traditional)

ZH_CITIES = ["台南", "高雄", "花蓮", "台中", "新竹", "宜蘭", "嘉義", "屏東"]
ZH_NAMES = ["小美", "小明", "阿傑", "小芳", "佳佳", "志豪", "怡君", "家豪"]
ZH_DOGS = ["麻糬", "豆花", "布丁", "旺財", "可樂", "芝麻", "湯圓", "黑糖"]
ZH_BANDS = ["五月天", "蘇打綠", "草東沒有派對", "告五人", "八三夭", "滅火器"]
ZH_PLACES = ["京都", "首爾", "清邁", "峴港", "札幌", "沖繩"]


def zh_facts(r: random.Random) -> list[Fact]:
    city, kid, dog = r.choice(ZH_CITIES), r.choice(ZH_NAMES), r.choice(ZH_DOGS)
    code = r.randint(1000, 9999)
    band, place = r.choice(ZH_BANDS), r.choice(ZH_PLACES)
    rent = r.choice([15000, 18000, 22000, 26000])
    return [
        Fact((f"對了，我妹妹去年春天搬到{city}了。",), "我妹妹現在住在哪個城市？"),
        Fact(("我終於從收容所領養了一隻柴犬。", f"我們決定叫牠{dog}。"),
             "我養的那隻小狗叫什麼名字？"),
        Fact((f"提醒自己：車庫門的密碼是{code}。",), "車庫的密碼是多少來著？"),
        Fact(("我對花生過敏，所以買東西都會看成分標示。",), "我對哪種食物過敏？"),
        Fact((f"我女兒{kid}九月要上幼稚園了。",), f"{kid}什麼時候開始上學？"),
        Fact(("我換工作了，現在在一家物流公司當資料工程師。",), "我現在做什麼工作？"),
        Fact((f"我最喜歡的樂團是{band}，2017年還去看過他們的演唱會。",),
             "我最愛聽哪個樂團？"),
        Fact((f"我們訂了四月第一週去{place}的行程。",), "我們四月的旅行要去哪裡？"),
        Fact((f"房東剛把房租漲到每個月{rent}元。",), "我現在每個月租金付多少？"),
    ]


ZH_FILLER = [
    "可以推薦一個{day}晚餐做{dish}的簡單食譜嗎？",
    "今天上班很{adj}，主管又問了{project}專案的進度。",
    "這週天氣{weather}，所以我待在家裡看書。",
    "我在考慮晚上去學{skill}，有什麼入門建議嗎？",
    "我妹妹打電話跟我聊{topic}，講了一個小時。",
    "要怎麼用有限的預算規劃一個{length}的週末旅行？",
    "我昨天晚上看了{movie}，你覺得結局怎麼樣？",
    "幫我想想怎麼讓早上的生活不要那麼匆忙。",
    "我們團隊午餐去吃{cuisine}料理，東西很{adj}。",
    "我要送禮物給一個喜歡{hobby}的朋友，有什麼點子？",
    "出門一個禮拜的話，植物要怎麼照顧才不會死？",
    "今天工作上的程式碼審查因為{topic}拖了好久。",
    "小孩一直吵著要養寵物，可是我不確定有沒有時間。",
    "有沒有二十分鐘內就能做好的{dish}？",
    "我今天{daypart}去公園跑步，感覺很{adj}。",
    "你覺得客廳要不要漆成{colour}？",
    "我在讀一本關於{topic}的書，目前覺得很{adj}。",
    "回家的路上塞車塞得很{adj}，晚餐又遲到了。",
    "我的車快要換輪胎了，要注意什麼？",
    "{thing}跟{thing2}有什麼不一樣？",
    "可以幫我寫一張紙條給鄰居，說一下{topic}的事嗎？",
    "我跟我媽聊過年的安排，聊得很{adj}。",
    "我們明年可能要租大一點的房子，要注意哪些事情？",
    "我想少喝一點咖啡，{daypart}有什麼可以替代的飲料？",
]
ZH_SLOTS = {
    "dish": ["義大利麵", "咖哩", "湯", "沙拉", "炒飯", "蛋餅", "滷肉飯"],
    "day": ["星期一", "星期二", "星期五", "星期天"],
    "adj": ["累", "普通", "忙", "棒", "奇怪", "慢", "愉快"],
    "project": ["帳務", "搬遷", "報表", "搜尋", "新人訓練"],
    "weather": ["一直下雨", "很冷", "很熱", "風很大", "陰陰的"],
    "skill": ["西班牙文", "畫畫", "下棋", "攝影", "吉他"],
    "topic": ["報稅", "她的新工作", "婚禮", "漏水", "歷史", "睡眠", "爸媽", "學校的課表"],
    "length": ["三天", "兩天", "長"],
    "movie": ["一部紀錄片", "一部老西部片", "一部科幻片", "一部喜劇"],
    "cuisine": ["泰式", "墨西哥", "義式", "韓式", "希臘"],
    "hobby": ["爬山", "桌遊", "烘焙", "園藝", "音樂"],
    "daypart": ["早上", "下午", "晚上"],
    "colour": ["綠色", "白色", "藍色", "黃色"],
    "thing": ["拿鐵", "路由器", "房貸", "病毒", "律詩"],
    "thing2": ["白咖啡", "數據機", "信貸", "細菌", "絕句"],
}


def _fill(r: random.Random, template: str, slots: dict[str, list[str]]) -> str:
    out = template
    for name, values in slots.items():
        while "{" + name + "}" in out:
            out = out.replace("{" + name + "}", r.choice(values), 1)
    return out


def build(count: int = 10, turns: int = TURNS, seed: int = 2026) -> list[Conversation]:
    """`count` conversations, alternating English and Chinese, each `turns` user turns."""
    r = random.Random(seed)
    convs = []
    for n in range(count):
        lang = "en" if n % 2 == 0 else "zh"
        conv = Conversation(lang, f"mem{n:02d}")
        facts = (en_facts if lang == "en" else zh_facts)(r)
        r.shuffle(facts)
        conv.facts = facts[:FACTS_PER_CONVERSATION]
        filler, slots = (EN_FILLER, EN_SLOTS) if lang == "en" else (ZH_FILLER, ZH_SLOTS)
        # Facts spread over the whole history, each at a known turn.
        spacing = (turns - 20) // len(conv.facts)
        starts = [10 + i * spacing + r.randrange(max(1, spacing - 3))
                  for i in range(len(conv.facts))]
        turn_of: dict[int, tuple[int, int]] = {}
        for fi, start in enumerate(starts):
            for part in range(len(conv.facts[fi].texts)):
                turn_of[start + part * 2] = (fi, part)  # the second part two turns later
        for t in range(turns):
            if t in turn_of:
                fi, part = turn_of[t]
                conv.turns.append(conv.facts[fi].texts[part])
                conv.planted[t] = fi
            else:
                conv.turns.append(_fill(r, r.choice(filler), slots))
        convs.append(conv)
    return convs


def reply_to(text: str, lang: str, n: int) -> str:
    """The scripted model's answer: topical, 60-90 tokens, like a concise assistant."""
    r = random.Random(zlib.crc32(f"{n}:{text}".encode()))
    if lang == "zh":
        parts = ["好問題！", "我的建議是先從簡單的地方開始，", "把事情分成幾個小步驟，",
                 "每天固定一點時間去做，", "也可以跟朋友或家人一起討論，",
                 "如果遇到困難，再調整計畫就好。", "希望這些對你有幫助，", "有需要再跟我說。",
                 "另外，記得照顧好自己的身體，", "睡眠和飲食都很重要。"]
        return "".join(r.sample(parts, 6))
    parts = ["Good question!", "I'd start with the simplest option and see how it goes.",
             "Break it into a few small steps and do one each day.",
             "It often helps to talk it over with a friend or family member.",
             "If something doesn't work, adjust the plan rather than dropping it.",
             "Keep notes so you can see what actually made a difference.",
             "Don't forget to rest; sleep and food matter more than we think.",
             "Let me know how it turns out and we can refine it together."]
    return " ".join(r.sample(parts, 5))
