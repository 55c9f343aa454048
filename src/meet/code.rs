//! One-time codes: `NAMEPLATE-WORD-WORD`, like `7-clockwork-crossover`.
//!
//! The **nameplate** is public: the untrusted rendezvous pairs two peers by it. The **two
//! words** are the secret, and never reach the rendezvous: both peers feed the whole code
//! to the PAKE ([`super::pake`]), which binds the nameplate too.
//!
//! Sixteen bits of secret are enough because a PAKE only allows *online* guessing: nobody,
//! the rendezvous included, learns anything to test guesses against offline. Each guess
//! costs a full exchange with the live peer, which then fails loudly
//! ([`WrongCodeOrTampered`](super::pake::PakeError::WrongCodeOrTampered)), and a code
//! is used once: one guess, one chance in 65 536.
//!
//! The words come from the PGP word list (Juola and Zimmermann, 1995, public domain): 256
//! two-syllable "even" words ([`EVEN_WORDS`]) and 256 three-syllable "odd" words
//! ([`ODD_WORDS`]), picked to sound distinct when read aloud. A code has one of each, one
//! random byte each, and is written even word first.
//!
//! Parsing is lenient wherever leniency cannot change which secret is meant:
//! - case does not matter, surrounding whitespace is ignored, and parts may be separated by
//!   `-`, spaces, or both (`7 Clockwork Crossover`);
//! - **the words may come in either order.** The two lists are disjoint, so a word alone
//!   says which list, and so which byte, it stands for: `7-crossover-clockwork` is the
//!   same code as `7-clockwork-crossover`, and both peers derive the password from the
//!   canonical form. Swapping the words when reading them out, the very mistake the PGP
//!   even/odd split exists to catch, then simply does not matter;
//! - two words from the same list cannot form a code, and the error says so;
//! - an unknown word is an error that suggests the closest word of the list it should come
//!   from (`clokwork` → `clockwork`), by edit distance with transpositions.

use std::fmt;
use std::str::FromStr;

use rand::CryptoRng;

use crate::rendezvous::shown;
pub use crate::rendezvous::{MAX_NAMEPLATE_LEN, Nameplate, NameplateError};

/// Longest text [`Code::from_str`] looks at. A real code is under 60 characters; the bound
/// keeps typo suggestions cheap whatever is pasted in.
pub const MAX_CODE_LEN: usize = 256;

/// What a code looks like, for error messages.
const EXAMPLE: &str = "7-clockwork-crossover";

/// Inputs longer than this get no typo suggestion (the longest list word has 11 letters).
const MAX_SUGGEST_LEN: usize = 24;

/// A one-time code: a [`Nameplate`] and two secret words, one from each PGP list.
///
/// `Display` writes the canonical form (`7-clockwork-crossover`: lowercase, even word
/// first); `FromStr` parses it back, and more leniently (see the [module docs](self)).
/// `Debug` hides the words, so a code logged by accident does not leak its secret.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Code {
    nameplate: Nameplate,
    /// Index into [`EVEN_WORDS`], then into [`ODD_WORDS`].
    words: [u8; 2],
}

impl Code {
    /// The code with this nameplate whose words stand for these two bytes
    /// (`bytes[0]` picks the even word, `bytes[1]` the odd one).
    pub fn new(nameplate: Nameplate, bytes: [u8; 2]) -> Self {
        Code {
            nameplate,
            words: bytes,
        }
    }

    /// A fresh code for `nameplate`, with 16 random bits of secret from `rng`.
    pub fn generate(nameplate: Nameplate, rng: &mut impl CryptoRng) -> Self {
        let mut bytes = [0; 2];
        rng.fill_bytes(&mut bytes);
        Code::new(nameplate, bytes)
    }

    /// The public part.
    pub fn nameplate(&self) -> &Nameplate {
        &self.nameplate
    }

    /// The two secret words, even word first.
    pub fn words(&self) -> [&'static str; 2] {
        [
            EVEN_WORDS[usize::from(self.words[0])],
            ODD_WORDS[usize::from(self.words[1])],
        ]
    }

    /// The PAKE password: the whole canonical code as bytes, so the nameplate is bound too
    /// (a code's words are worthless under another nameplate), and every way of typing the
    /// same code gives the same password.
    pub fn secret_bytes(&self) -> Vec<u8> {
        self.to_string().into_bytes()
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [even, odd] = self.words();
        write!(f, "{}-{even}-{odd}", self.nameplate)
    }
}

impl fmt::Debug for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Code")
            .field("nameplate", &self.nameplate.as_str())
            .field("words", &"<secret>")
            .finish()
    }
}

impl FromStr for Code {
    type Err = CodeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > MAX_CODE_LEN {
            return Err(CodeError::TooLong(s.len()));
        }
        let parts: Vec<&str> = s
            .split(|c: char| c == '-' || c.is_whitespace())
            .filter(|part| !part.is_empty())
            .collect();
        let (nameplate, first, second) = match parts[..] {
            [] => return Err(CodeError::Empty),
            [nameplate, first, second] => (nameplate, first, second),
            [_] => return Err(CodeError::Shape("the two words are missing")),
            [a, b] if lookup(a).is_some() && lookup(b).is_some() => {
                return Err(CodeError::Shape(
                    "the nameplate before the words is missing",
                ));
            }
            [_, _] => return Err(CodeError::Shape("one word is missing")),
            _ => return Err(CodeError::Shape("it has too many parts")),
        };
        if lookup(nameplate).is_some() && second.chars().all(|c| c.is_ascii_digit()) {
            return Err(CodeError::Shape("the nameplate comes first"));
        }
        let nameplate: Nameplate = nameplate.parse()?;
        let unknown = |word: &str, list| CodeError::UnknownWord {
            word: shown(word),
            suggestion: suggest(word, list),
        };
        let bytes = match (lookup(first), lookup(second)) {
            (None, other) => return Err(unknown(first, other.map(|(list, _)| list.other()))),
            (Some((list, _)), None) => return Err(unknown(second, Some(list.other()))),
            (Some((List::Even, even)), Some((List::Odd, odd)))
            | (Some((List::Odd, odd)), Some((List::Even, even))) => [even, odd],
            (Some((list, _)), Some(_)) => {
                return Err(CodeError::SameList {
                    words: [first.to_ascii_lowercase(), second.to_ascii_lowercase()],
                    syllables: list.syllables(),
                });
            }
        };
        Ok(Code::new(nameplate, bytes))
    }
}

/// Why text is not a [`Code`] (a bad nameplate alone is a [`NameplateError`]). Messages are meant for the person who
/// typed the code, and say how to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodeError {
    /// Nothing but whitespace and separators.
    #[error("empty code: expected NAMEPLATE-WORD-WORD, like {EXAMPLE}")]
    Empty,
    /// Longer than [`MAX_CODE_LEN`] bytes.
    #[error("a code is at most {MAX_CODE_LEN} characters, this is {0}")]
    TooLong(usize),
    /// Not a nameplate and two words.
    #[error("expected NAMEPLATE-WORD-WORD, like {EXAMPLE}, but {0}")]
    Shape(&'static str),
    /// The nameplate is empty, too long, or has characters other than `a-z0-9`.
    #[error("bad nameplate {nameplate:?}: {problem}")]
    Nameplate {
        /// The nameplate as given (at most its first 40 characters).
        nameplate: String,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// A word that is in neither list.
    #[error("{word:?} is not a code word{}", did_you_mean(*.suggestion))]
    UnknownWord {
        /// The word as given (at most its first 40 characters).
        word: String,
        /// The closest list word, if one is close enough to be a likely typo.
        suggestion: Option<&'static str>,
    },
    /// Both words come from the same list.
    #[error(
        "{:?} and {:?} are both {syllables}-syllable words, but a code has one \
         two-syllable and one three-syllable word: check the code with the other person",
        .words[0], .words[1]
    )]
    SameList {
        /// The two words, lowercased.
        words: [String; 2],
        /// Syllables in each word of that list: 2 (even list) or 3 (odd list).
        syllables: u8,
    },
}

impl From<NameplateError> for CodeError {
    fn from(e: NameplateError) -> Self {
        CodeError::Nameplate {
            nameplate: e.nameplate,
            problem: e.problem,
        }
    }
}

fn did_you_mean(suggestion: Option<&str>) -> String {
    suggestion.map_or_else(String::new, |word| format!(": did you mean {word:?}?"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum List {
    Even,
    Odd,
}

impl List {
    fn words(self) -> &'static [&'static str; 256] {
        match self {
            List::Even => &EVEN_WORDS,
            List::Odd => &ODD_WORDS,
        }
    }

    fn other(self) -> List {
        match self {
            List::Even => List::Odd,
            List::Odd => List::Even,
        }
    }

    fn syllables(self) -> u8 {
        match self {
            List::Even => 2,
            List::Odd => 3,
        }
    }
}

/// Which list a word is in, and its byte. Case-insensitive.
fn lookup(word: &str) -> Option<(List, u8)> {
    [List::Even, List::Odd].into_iter().find_map(|list| {
        let index = list
            .words()
            .iter()
            .position(|w| w.eq_ignore_ascii_case(word))?;
        Some((list, u8::try_from(index).ok()?))
    })
}

/// The closest word to a typo, from `list` if we know which list it belongs to, else from
/// both; `None` if nothing is within two edits (fewer for very short input).
fn suggest(typo: &str, list: Option<List>) -> Option<&'static str> {
    let typo: Vec<char> = typo.to_lowercase().chars().collect();
    if typo.len() > MAX_SUGGEST_LEN {
        return None;
    }
    let limit = typo.len().saturating_sub(1).min(2);
    let lists = match list {
        Some(list) => vec![list],
        None => vec![List::Even, List::Odd],
    };
    lists
        .into_iter()
        .flat_map(|list| list.words().iter())
        .map(|&word| (edit_distance(&typo, word), word))
        .filter(|&(distance, _)| distance <= limit)
        .min_by_key(|&(distance, _)| distance)
        .map(|(_, word)| word)
}

/// Optimal string alignment distance: insertions, deletions, substitutions and swaps of
/// two adjacent letters each cost one. Quadratic, so callers bound the input.
fn edit_distance(a: &[char], b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    // rows[i][j]: distance between a[..i] and b[..j]; three rows are enough.
    let mut before = vec![0; b.len() + 1];
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    let mut current = vec![0; b.len() + 1];
    for i in 1..=a.len() {
        current[0] = i;
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (previous[j] + 1)
                .min(current[j - 1] + 1)
                .min(previous[j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(before[j - 2] + 1);
            }
            current[j] = best;
        }
        std::mem::swap(&mut before, &mut previous);
        std::mem::swap(&mut previous, &mut current);
    }
    previous[b.len()]
}

/// The PGP word list's 256 two-syllable "even" words, byte `i` at index `i`.
/// Lowercased; the list is alphabetical.
#[rustfmt::skip]
pub const EVEN_WORDS: [&str; 256] = [
    "aardvark", "absurd", "accrue", "acme", "adrift", "adult", "afflict", "ahead", // 0x00
    "aimless", "algol", "allow", "alone", "ammo", "ancient", "apple", "artist", // 0x08
    "assume", "athens", "atlas", "aztec", "baboon", "backfield", "backward", "banjo", // 0x10
    "beaming", "bedlamp", "beehive", "beeswax", "befriend", "belfast", "berserk", "billiard", // 0x18
    "bison", "blackjack", "blockade", "blowtorch", "bluebird", "bombast", "bookshelf", "brackish", // 0x20
    "breadline", "breakup", "brickyard", "briefcase", "burbank", "button", "buzzard", "cement", // 0x28
    "chairlift", "chatter", "checkup", "chisel", "choking", "chopper", "christmas", "clamshell", // 0x30
    "classic", "classroom", "cleanup", "clockwork", "cobra", "commence", "concert", "cowbell", // 0x38
    "crackdown", "cranky", "crowfoot", "crucial", "crumpled", "crusade", "cubic", "dashboard", // 0x40
    "deadbolt", "deckhand", "dogsled", "dragnet", "drainage", "dreadful", "drifter", "dropper", // 0x48
    "drumbeat", "drunken", "dupont", "dwelling", "eating", "edict", "egghead", "eightball", // 0x50
    "endorse", "endow", "enlist", "erase", "escape", "exceed", "eyeglass", "eyetooth", // 0x58
    "facial", "fallout", "flagpole", "flatfoot", "flytrap", "fracture", "framework", "freedom", // 0x60
    "frighten", "gazelle", "geiger", "glitter", "glucose", "goggles", "goldfish", "gremlin", // 0x68
    "guidance", "hamlet", "highchair", "hockey", "indoors", "indulge", "inverse", "involve", // 0x70
    "island", "jawbone", "keyboard", "kickoff", "kiwi", "klaxon", "locale", "lockup", // 0x78
    "merit", "minnow", "miser", "mohawk", "mural", "music", "necklace", "neptune", // 0x80
    "newborn", "nightbird", "oakland", "obtuse", "offload", "optic", "orca", "payday", // 0x88
    "peachy", "pheasant", "physique", "playhouse", "pluto", "preclude", "prefer", "preshrunk", // 0x90
    "printer", "prowler", "pupil", "puppy", "python", "quadrant", "quiver", "quota", // 0x98
    "ragtime", "ratchet", "rebirth", "reform", "regain", "reindeer", "rematch", "repay", // 0xa0
    "retouch", "revenge", "reward", "rhythm", "ribcage", "ringbolt", "robust", "rocker", // 0xa8
    "ruffled", "sailboat", "sawdust", "scallion", "scenic", "scorecard", "scotland", "seabird", // 0xb0
    "select", "sentence", "shadow", "shamrock", "showgirl", "skullcap", "skydive", "slingshot", // 0xb8
    "slowdown", "snapline", "snapshot", "snowcap", "snowslide", "solo", "southward", "soybean", // 0xc0
    "spaniel", "spearhead", "spellbind", "spheroid", "spigot", "spindle", "spyglass", "stagehand", // 0xc8
    "stagnate", "stairway", "standard", "stapler", "steamship", "sterling", "stockman", "stopwatch", // 0xd0
    "stormy", "sugar", "surmount", "suspense", "sweatband", "swelter", "tactics", "talon", // 0xd8
    "tapeworm", "tempest", "tiger", "tissue", "tonic", "topmost", "tracker", "transit", // 0xe0
    "trauma", "treadmill", "trojan", "trouble", "tumor", "tunnel", "tycoon", "uncut", // 0xe8
    "unearth", "unwind", "uproot", "upset", "upshot", "vapor", "village", "virus", // 0xf0
    "vulcan", "waffle", "wallet", "watchword", "wayside", "willow", "woodlark", "zulu", // 0xf8
];

/// The PGP word list's 256 three-syllable "odd" words, byte `i` at index `i`.
/// Lowercased; alphabetical except `apollo`, which the published list has at `0x0a`.
#[rustfmt::skip]
pub const ODD_WORDS: [&str; 256] = [
    "adroitness", "adviser", "aftermath", "aggregate", "alkali", "almighty", "amulet", "amusement", // 0x00
    "antenna", "applicant", "apollo", "armistice", "article", "asteroid", "atlantic", "atmosphere", // 0x08
    "autopsy", "babylon", "backwater", "barbecue", "belowground", "bifocals", "bodyguard", "bookseller", // 0x10
    "borderline", "bottomless", "bradbury", "bravado", "brazilian", "breakaway", "burlington", "businessman", // 0x18
    "butterfat", "camelot", "candidate", "cannonball", "capricorn", "caravan", "caretaker", "celebrate", // 0x20
    "cellulose", "certify", "chambermaid", "cherokee", "chicago", "clergyman", "coherence", "combustion", // 0x28
    "commando", "company", "component", "concurrent", "confidence", "conformist", "congregate", "consensus", // 0x30
    "consulting", "corporate", "corrosion", "councilman", "crossover", "crucifix", "cumbersome", "customer", // 0x38
    "dakota", "decadence", "december", "decimal", "designing", "detector", "detergent", "determine", // 0x40
    "dictator", "dinosaur", "direction", "disable", "disbelief", "disruptive", "distortion", "document", // 0x48
    "embezzle", "enchanting", "enrollment", "enterprise", "equation", "equipment", "escapade", "eskimo", // 0x50
    "everyday", "examine", "existence", "exodus", "fascinate", "filament", "finicky", "forever", // 0x58
    "fortitude", "frequency", "gadgetry", "galveston", "getaway", "glossary", "gossamer", "graduate", // 0x60
    "gravity", "guitarist", "hamburger", "hamilton", "handiwork", "hazardous", "headwaters", "hemisphere", // 0x68
    "hesitate", "hideaway", "holiness", "hurricane", "hydraulic", "impartial", "impetus", "inception", // 0x70
    "indigo", "inertia", "infancy", "inferno", "informant", "insincere", "insurgent", "integrate", // 0x78
    "intention", "inventive", "istanbul", "jamaica", "jupiter", "leprosy", "letterhead", "liberty", // 0x80
    "maritime", "matchmaker", "maverick", "medusa", "megaton", "microscope", "microwave", "midsummer", // 0x88
    "millionaire", "miracle", "misnomer", "molasses", "molecule", "montana", "monument", "mosquito", // 0x90
    "narrative", "nebula", "newsletter", "norwegian", "october", "ohio", "onlooker", "opulent", // 0x98
    "orlando", "outfielder", "pacific", "pandemic", "pandora", "paperweight", "paragon", "paragraph", // 0xa0
    "paramount", "passenger", "pedigree", "pegasus", "penetrate", "perceptive", "performance", "pharmacy", // 0xa8
    "phonetic", "photograph", "pioneer", "pocketful", "politeness", "positive", "potato", "processor", // 0xb0
    "provincial", "proximate", "puberty", "publisher", "pyramid", "quantity", "racketeer", "rebellion", // 0xb8
    "recipe", "recover", "repellent", "replica", "reproduce", "resistor", "responsive", "retraction", // 0xc0
    "retrieval", "retrospect", "revenue", "revival", "revolver", "sandalwood", "sardonic", "saturday", // 0xc8
    "savagery", "scavenger", "sensation", "sociable", "souvenir", "specialist", "speculate", "stethoscope", // 0xd0
    "stupendous", "supportive", "surrender", "suspicious", "sympathy", "tambourine", "telephone", "therapist", // 0xd8
    "tobacco", "tolerance", "tomorrow", "torpedo", "tradition", "travesty", "trombonist", "truncated", // 0xe0
    "typewriter", "ultimate", "undaunted", "underfoot", "unicorn", "unify", "universe", "unravel", // 0xe8
    "upcoming", "vacancy", "vagabond", "vertigo", "virginia", "visitor", "vocalist", "voyager", // 0xf0
    "warranty", "waterloo", "whimsical", "wichita", "wilmington", "wyoming", "yesteryear", "yucatan", // 0xf8
];

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use std::collections::HashSet;

    fn code(text: &str) -> Code {
        text.parse().unwrap_or_else(|e| panic!("{text:?}: {e}"))
    }

    #[test]
    fn word_lists_are_the_pgp_lists() {
        for list in [&EVEN_WORDS, &ODD_WORDS] {
            let unique: HashSet<_> = list.iter().collect();
            assert_eq!(unique.len(), 256, "no duplicates");
            assert!(
                list.iter()
                    .all(|w| !w.is_empty() && w.bytes().all(|b| b.is_ascii_lowercase()))
            );
        }
        assert!(
            EVEN_WORDS.iter().all(|w| !ODD_WORDS.contains(w)),
            "disjoint"
        );
        assert!(EVEN_WORDS.is_sorted(), "the even list is alphabetical");
        let mut odd = ODD_WORDS.to_vec();
        assert_eq!(odd.remove(0x0a), "apollo");
        assert!(
            odd.is_sorted(),
            "the odd list is alphabetical but for apollo"
        );
        // The worked example from the list's documentation: bytes alternate between the
        // even list (even positions) and the odd list.
        let bytes: [u8; 20] = [
            0xe5, 0x82, 0x94, 0xf2, 0xe9, 0xa2, 0x27, 0x48, 0x6e, 0x8b, 0x06, 0x1b, 0x31, 0xcc,
            0x52, 0x8f, 0xd7, 0xfa, 0x3f, 0x19,
        ];
        let words: Vec<&str> = bytes
            .iter()
            .enumerate()
            .map(|(i, &b)| [EVEN_WORDS, ODD_WORDS][i % 2][usize::from(b)])
            .collect();
        assert_eq!(
            words.join(" "),
            "topmost istanbul pluto vagabond treadmill pacific brackish dictator goldfish \
             medusa afflict bravado chatter revolver dupont midsummer stopwatch whimsical \
             cowbell bottomless"
        );
        assert_eq!((EVEN_WORDS[0], ODD_WORDS[0]), ("aardvark", "adroitness"));
        assert_eq!((EVEN_WORDS[255], ODD_WORDS[255]), ("zulu", "yucatan"));
    }

    #[test]
    fn display_is_canonical_and_round_trips() {
        let c = Code::new(Nameplate::from(7), [0x3b, 0x3c]);
        assert_eq!(c.to_string(), "7-clockwork-crossover");
        assert_eq!(c.words(), ["clockwork", "crossover"]);
        assert_eq!(c.nameplate().as_str(), "7");
        assert_eq!(code("7-clockwork-crossover"), c);
        assert_eq!(c.secret_bytes(), b"7-clockwork-crossover");
    }

    /// Every way of typing a code that cannot mean another secret parses to one code.
    #[test]
    fn lenient_parsing_table() {
        let canonical = "7-clockwork-crossover";
        for input in [
            "7-clockwork-crossover",
            "  7-clockwork-crossover\n",
            "7-Clockwork-CROSSOVER",
            "7 clockwork crossover",
            "7 - clockwork -- crossover",
            "\t7\u{a0}clockwork crossover ",
            "7-crossover-clockwork",
            "7 CrossOver clockwork",
        ] {
            assert_eq!(code(input).to_string(), canonical, "{input:?}");
        }
        assert_eq!(
            code("Abc123-aardvark-adroitness").to_string(),
            "abc123-aardvark-adroitness"
        );
        assert_eq!(code("0042-zulu-yucatan").nameplate().as_str(), "0042");
    }

    #[test]
    fn error_table() {
        use CodeError::*;
        let unknown = |word: &str, suggestion| UnknownWord {
            word: word.into(),
            suggestion,
        };
        let table: Vec<(&str, CodeError)> = vec![
            ("", Empty),
            ("  - -\n", Empty),
            ("7", Shape("the two words are missing")),
            (
                "clockwork-crossover",
                Shape("the nameplate before the words is missing"),
            ),
            ("7-clockwork", Shape("one word is missing")),
            (
                "7-clockwork-crossover-cobra",
                Shape("it has too many parts"),
            ),
            ("clockwork-crossover-7", Shape("the nameplate comes first")),
            (
                "7-clokwork-crossover",
                unknown("clokwork", Some("clockwork")),
            ),
            (
                "7-clockwork-crosover",
                unknown("crosover", Some("crossover")),
            ),
            (
                "7-clcokwork-crossover",
                unknown("clcokwork", Some("clockwork")),
            ),
            (
                "7-CLOKWORK-crossover",
                unknown("CLOKWORK", Some("clockwork")),
            ),
            // The other word is odd, so the suggestion comes from the even list.
            ("7-crossover-cobrra", unknown("cobrra", Some("cobra"))),
            ("7-xyzzy-crossover", unknown("xyzzy", None)),
            ("7-x-crossover", unknown("x", None)),
            (
                "7-clockwork-cobra",
                SameList {
                    words: ["clockwork".into(), "cobra".into()],
                    syllables: 2,
                },
            ),
            (
                "7-Crossover-adroitness",
                SameList {
                    words: ["crossover".into(), "adroitness".into()],
                    syllables: 3,
                },
            ),
            (
                "a_b-clockwork-crossover",
                Nameplate {
                    nameplate: "a_b".into(),
                    problem: "only letters a-z and digits 0-9 are allowed",
                },
            ),
            (
                "ü-clockwork-crossover",
                Nameplate {
                    nameplate: "ü".into(),
                    problem: "only letters a-z and digits 0-9 are allowed",
                },
            ),
            (
                "123456789012345678901234567890123-clockwork-crossover",
                Nameplate {
                    nameplate: "123456789012345678901234567890123".into(),
                    problem: "it is longer than 32 characters",
                },
            ),
        ];
        for (input, expected) in table {
            assert_eq!(input.parse::<Code>(), Err(expected), "{input:?}");
        }
        let long = format!("7-clockwork-crossover{}", " ".repeat(MAX_CODE_LEN));
        assert_eq!(long.parse::<Code>(), Err(TooLong(long.len())));
    }

    #[test]
    fn error_messages_help() {
        let msg = |input: &str| input.parse::<Code>().unwrap_err().to_string();
        assert_eq!(
            msg("7-clokwork-crossover"),
            r#""clokwork" is not a code word: did you mean "clockwork"?"#
        );
        assert_eq!(msg("7-xyzzy-crossover"), r#""xyzzy" is not a code word"#);
        assert!(
            msg("7").contains("like 7-clockwork-crossover"),
            "{}",
            msg("7")
        );
        assert!(msg("7-clockwork-cobra").contains("both 2-syllable words"));
        // Untrusted text is escaped and cut short.
        let hostile = format!("\x1b[31m{}", "a".repeat(100));
        let err = hostile.parse::<Nameplate>().unwrap_err().to_string();
        assert!(!err.contains('\x1b') && err.contains("\\u{1b}"), "{err}");
        assert!(err.len() < 120, "{err}");
    }

    #[test]
    fn nameplates() {
        assert_eq!("  42 ".parse::<Nameplate>().unwrap().as_str(), "42");
        assert_eq!(
            "MyScript7".parse::<Nameplate>().unwrap().as_str(),
            "myscript7"
        );
        assert_eq!(Nameplate::from(u32::MAX).to_string(), "4294967295");
        let max = "z".repeat(MAX_NAMEPLATE_LEN);
        assert_eq!(max.parse::<Nameplate>().unwrap().as_str(), max);
        for bad in ["", "  ", "a-b", "a b", "a.b", "z".repeat(33).as_str(), "٣"] {
            assert!(
                matches!(bad.parse::<Nameplate>(), Err(NameplateError { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn generate_is_deterministic_for_a_seed_and_covers_both_lists() {
        let nameplate = Nameplate::from(7);
        let a = Code::generate(nameplate.clone(), &mut StdRng::seed_from_u64(1));
        let b = Code::generate(nameplate.clone(), &mut StdRng::seed_from_u64(1));
        assert_eq!(a, b);
        let mut rng = StdRng::seed_from_u64(2);
        let codes: Vec<Code> = (0..4096)
            .map(|_| Code::generate(nameplate.clone(), &mut rng))
            .collect();
        let distinct: HashSet<_> = codes.iter().collect();
        // 4096 draws from 65 536 codes: about 3970 distinct expected.
        assert!(distinct.len() > 3800, "{}", distinct.len());
        let evens: HashSet<_> = codes.iter().map(|c| c.words()[0]).collect();
        let odds: HashSet<_> = codes.iter().map(|c| c.words()[1]).collect();
        assert_eq!((evens.len(), odds.len()), (256, 256));
    }

    #[test]
    fn secret_binds_the_nameplate() {
        let a = code("7-clockwork-crossover");
        let b = code("8-clockwork-crossover");
        assert_ne!(a.secret_bytes(), b.secret_bytes());
        assert_eq!(
            a.secret_bytes(),
            code("7 Crossover Clockwork").secret_bytes()
        );
    }

    #[test]
    fn debug_hides_the_words() {
        let debug = format!("{:?}", code("7-clockwork-crossover"));
        assert!(
            !debug.contains("clockwork") && !debug.contains("crossover"),
            "{debug}"
        );
        assert!(debug.contains("\"7\""), "{debug}");
    }

    #[test]
    fn edit_distance_counts_swaps_as_one() {
        let d = |a: &str, b: &str| edit_distance(&a.chars().collect::<Vec<_>>(), b);
        assert_eq!(d("clockwork", "clockwork"), 0);
        assert_eq!(d("clokwork", "clockwork"), 1);
        assert_eq!(d("clcokwork", "clockwork"), 1);
        assert_eq!(d("", "cobra"), 5);
        assert_eq!(d("cobra", ""), 5);
        assert_eq!(d("kitten", "sitting"), 3);
    }

    fn any_code() -> impl Strategy<Value = Code> {
        ("[a-z0-9]{1,32}", any::<[u8; 2]>())
            .prop_map(|(nameplate, bytes)| Code::new(nameplate.parse().unwrap(), bytes))
    }

    proptest! {
        #[test]
        fn display_parse_round_trip(c in any_code()) {
            prop_assert_eq!(c.to_string().parse::<Code>(), Ok(c));
        }

        #[test]
        fn lenient_forms_parse_to_the_same_code(c in any_code(), swap in any::<bool>(), upper in any::<bool>()) {
            let [even, odd] = c.words();
            let (first, second) = if swap { (odd, even) } else { (even, odd) };
            let mut text = format!("  {} {first} - {second} ", c.nameplate());
            if upper {
                text = text.to_uppercase();
            }
            prop_assert_eq!(text.parse::<Code>(), Ok(c));
        }

        #[test]
        fn parse_never_panics(text in any::<String>()) {
            let _ = text.parse::<Code>();
            let _ = text.parse::<Nameplate>();
        }

        #[test]
        fn parse_never_panics_near_valid(c in any_code(), at in any::<prop::sample::Index>(), junk in any::<char>()) {
            let mut text: Vec<char> = c.to_string().chars().collect();
            let i = at.index(text.len());
            text[i] = junk;
            let text: String = text.into_iter().collect();
            if let Ok(parsed) = text.parse::<Code>() {
                // Whatever parses displays as a valid code that parses back to itself.
                prop_assert_eq!(parsed.to_string().parse::<Code>(), Ok(parsed));
            }
        }
    }
}
