"""Word lists of the built-in story corpus: simple words a children's story uses, grouped by role."""

from __future__ import annotations


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


def _phrases(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


GIRL_NAMES = _words("""
Lily Mia Sue Anna Lucy Emma Zoe Amy Ella Rose Kate Sara Nina Ruby Ivy Maya Lola Daisy Molly Grace Hannah Chloe Sophie
Alice Jane Clara Nora Eva Lena Julia Tina Rita Bella Stella Hazel Poppy Wendy Holly Jenny Kitty Penny Dora Olive Iris
Fern Pearl Abby Becky Cindy Fiona Gina Heidi Irene Joy Kim Laura Megan Nell Opal Paula Quinn Rosa Tess Una Vera Willa
Yara Zara Ada Bea Cleo Dina Elsa Flora Gemma Hope Jade Lara Mae Nia Pia Rae Tara Amber April Beth Carla Daphne Edith
Faith Gloria Harriet Ingrid Josie Kara Lottie Mabel Naomi Odette Phoebe Rosie Sadie Thea Violet Winnie Xena Yvonne
Zelda Ava Bonnie Coco Darla Effie Freya Gwen Hattie Isla Juno Kiki Luna Millie Nova Orla Pippa Queenie Rita Suki Tilly
""")
BOY_NAMES = _words("""
Tim Ben Max Sam Tom Jack Leo Finn Jake Luke Noah Owen Ryan Adam Alex Eli Gus Hugo Ivan Joe Kai Liam Milo Ned Oscar Pete
Ray Sid Ted Vic Will Zack Bob Carl Dan Evan Fred Gabe Hank Ian Jon Ken Lenny Mark Nick Ollie Paul Rex Seth Toby Ulf
Vince Walt Yusuf Zeke Andy Billy Charlie Danny Eddie Frank George Harry Jimmy Kevin Louie Matt Nate Otis Percy Rudy Stan
Timmy Vinny Wes Arlo Bruno Cody Dexter Felix Henry Jasper Kurt Miles Rowan Theo Abe Barney Cal Duke Ezra Finley
Grant Hector Isaac Jonah Kit Lars Marty Nolan Oliver Parker Quentin Reggie Simon Tucker Upton Victor Wally Xavier
Yogi Zane Archie Benny Casper Dougie Elmer Fergus Gordon Huck Iggy Jerry Kenny Lucas Monty Norman Ozzie Pablo Rocco
""")
ANIMALS = _words("""
cat dog bunny bear fox owl duck frog mouse pig cow horse sheep goat lamb hen chick bird puppy kitten deer squirrel
turtle fish whale dolphin seal penguin lion tiger zebra giraffe monkey elephant hippo panda koala kangaroo wolf raccoon
hedgehog beaver otter badger mole rat hamster parrot robin sparrow crow eagle swan goose pony donkey camel snail bee
butterfly ladybug ant spider worm crab octopus lizard snake dragon unicorn moose bat chipmunk skunk llama ferret
seahorse starfish jellyfish peacock flamingo pelican toucan owlet calf foal cub piglet duckling gosling
beetle cricket firefly
alligator armadillo bison buffalo canary cheetah chicken cobra condor coyote crocodile dove falcon gerbil gorilla
grasshopper guppy hare heron hummingbird iguana jaguar kiwi lemur leopard lobster magpie meerkat mink mule newt
ostrich panther parakeet pigeon platypus porcupine possum puffin quail rabbit reindeer rhino salmon sloth stork
tadpole toad trout walrus weasel woodpecker yak
""")
CHARACTER_ADJECTIVES = _words("""
little small big kind brave curious shy happy silly clever gentle friendly cheerful playful quiet busy sleepy funny
young smart proud careful helpful sweet bouncy fluffy tiny fast strong caring honest polite lucky jolly bright eager
calm bold lively merry neat patient sunny tidy warm wise chatty cozy daring dreamy fair fearless gentle giggly
grateful hopeful humble jumpy loyal mighty nimble peaceful perky plucky quick quirky rosy sensible sleek snug sprightly
spunky thoughtful trusty witty zippy chubby fuzzy
""")
COLORS = _words("""
red blue green yellow pink purple orange white black brown gray golden silver shiny striped spotted rainbow
crimson teal violet lime peach navy cream copper sparkly glittery checkered velvet wooden woolly
""")
OBJECTS = _words("""
ball kite doll teddy truck car train boat hat scarf shoe sock mitten book crayon pencil drum whistle bell box basket
bucket shovel spoon cup bowl plate blanket pillow ribbon bow necklace ring button marble rock shell feather leaf flower
stick balloon bubble wand crown cape mask puzzle block robot plane rocket bike wagon sled umbrella lamp clock key map
coin stone flag rope swing jar bottle brush comb mirror bag backpack lunchbox toy bear sticker card letter picture
painting kazoo flute guitar piano trumpet harmonica yoyo top jumprope hoop frisbee bat glove helmet boot jacket sweater
apron bracelet badge candle lantern flashlight compass telescope magnet seed pot vase cookie cake pie sandwich apple
banana pear cherry carrot muffin pretzel cupcake acorn anchor arrow bead blanket bone bucket bugle cane cannon
chalk charm chest cloud comic compass cradle crayon crystal cushion dice dish drum easel envelope fan fiddle globe
goggles hammer harp hose jewel kettle ladder locket mug napkin net notebook oar paddle parasol pebble pendant pinwheel
pipe quilt rattle saddle satchel scooter shield slipper spinner spyglass stool stroller sundial sword tambourine teapot
tent thimble ticket tiara tractor trophy trowel tuba tutu vest violin wheel whisk xylophone zipper
""")
FOODS = _words("""
apples bananas cookies cake soup bread cheese carrots berries grapes pie honey milk juice pancakes muffins sandwiches
pears plums peaches corn peas beans rice noodles eggs toast jam butter cereal yogurt popcorn pretzels nuts seeds oranges
lemons melons cherries tomatoes potatoes pumpkins cupcakes crackers waffles pizza almonds apricots avocados
bagels biscuits blueberries broccoli brownies buns carrots cucumbers dates donuts dumplings figs granola kiwis lettuce
limes mangoes marshmallows meatballs oatmeal olives onions pancakes papayas peanuts pineapples porridge radishes
raisins raspberries spinach strawberries tacos turnips walnuts watermelon
""")
PEOPLE = _phrases("""
Mom, Dad, Grandma, Grandpa, the teacher, the farmer, the baker, the old man, the nice lady, Aunt May, Uncle Joe,
the mail carrier, the firefighter, the doctor, the nurse, the fisherman, the gardener, the painter, the mayor,
the zookeeper, the librarian, the shopkeeper, the bus driver, the police officer, the chef, the sailor, the pilot,
the carpenter, the dentist, the vet, big sister, big brother, the neighbor
""")
OBJECT_ADJECTIVES = _words("""
soft smooth bumpy heavy light round square tiny huge fluffy fuzzy squishy shiny dusty sticky slippery bouncy
crinkly cuddly delicate enormous fancy flat floppy fragile glossy handmade jingly lumpy magical noisy old plain
precious prickly scratchy sparkling special squeaky sturdy tall tangled warm wobbly wrinkly new beautiful favorite
""")
CLOTHES = _words("coat hat scarf mittens socks boots sweater cap dress shirt vest gloves apron cloak")
FEELINGS_GOOD = _words("""
happy glad proud excited calm safe warm joyful cheerful thankful relieved delighted pleased thrilled content
hopeful brave cozy giddy jolly
""")
FEELINGS_BAD = _words("""
sad scared worried upset lonely grumpy tired cross nervous afraid unhappy frightened gloomy jealous confused
shy embarrassed disappointed annoyed sleepy
""")
WEATHER = _words("sunny bright warm cold windy cloudy rainy snowy foggy breezy chilly lovely misty stormy hot frosty")
SMELLS = _phrases("""
fresh bread, wet grass, sweet flowers, warm cookies, pine needles, salty sea air, hot soup, ripe apples, rain,
wood smoke, lemon cake, cinnamon, clean laundry, honey, mint leaves
""")
SOUNDS = _phrases("""
birds singing, leaves rustling, a bell ringing, frogs croaking, bees buzzing, a dog barking, water splashing,
children laughing, the wind whistling, a train tooting, crickets chirping, drums beating, an owl hooting
""")
PLAY_VERBS = _phrases("""
ran, jumped, danced, sang, played tag, played catch, built a fort, skipped, hopped, rolled in the grass,
played hide and seek, drew pictures, looked at the clouds, counted the birds, made a sand castle, splashed,
climbed, spun around, laughed, told jokes, picked flowers, chased butterflies, raced, flew a kite, sang songs,
read a book, blew bubbles, played a game, made a wish, looked for bugs, skipped stones, fed the ducks,
built a snowman, painted rocks, collected leaves, watched the ants, played leapfrog, had a race, tossed a ball,
swung on the swings, slid down the slide, made daisy chains, hummed a tune, played pretend, made mud pies,
jumped in puddles, drew in the sand, looked for shells, climbed a hill, rolled down the hill, played marbles,
shared a snack, told stories, played dress-up, built a tower of blocks, searched for treasure, whistled a song
""")
MORALS = _phrases("""
sharing makes everyone happy, friends help each other, it is good to be brave, it is good to ask for help,
being kind is the best thing, it is okay to make mistakes, patience helps you find things, working together is fun,
saying sorry makes things better, a good friend is a treasure, trying again is how you learn, being careful keeps
your things safe, small things can make a big difference, listening to others is wise, helping others feels good
""")

# A place: where the story happens, things to see there, hiding spots, and a local helper animal.
PLACES: dict[str, dict[str, tuple[str, ...]]] = {
    "park": dict(
        sights=_phrases("green swings, a tall slide, a big oak tree, a little pond, kids on the seesaw"),
        spots=_phrases("under the slide, behind the oak tree, in the tall grass, near the pond, by the bench"),
        helpers=_words("squirrel duck dog robin"),
    ),
    "beach": dict(
        sights=_phrases("soft sand, big waves, pretty shells, a red boat, seagulls in the sky"),
        spots=_phrases("under the sand, behind a big rock, near the water, in a tide pool, by the old boat"),
        helpers=_words("crab seal seagull turtle"),
    ),
    "forest": dict(
        sights=_phrases("tall trees, soft moss, wild berries, a bubbling stream, tiny mushrooms"),
        spots=_phrases("inside a hollow log, under a pile of leaves, behind a bush, near the stream, in a hole"),
        helpers=_words("owl fox deer rabbit"),
    ),
    "garden": dict(
        sights=_phrases("bright flowers, a vegetable patch, busy bees, a little fountain, a stone path"),
        spots=_phrases("under a big leaf, behind the flower pots, in the carrot patch, by the fountain"),
        helpers=_words("snail bee ladybug worm"),
    ),
    "farm": dict(
        sights=_phrases("a red barn, hay bales, a muddy pond, cows in the field, a noisy rooster"),
        spots=_phrases("in the hay, behind the barn, under the tractor, near the chicken coop, by the fence"),
        helpers=_words("cow horse hen goat"),
    ),
    "lake": dict(
        sights=_phrases("calm blue water, a wooden dock, lily pads, tall reeds, a small island"),
        spots=_phrases("under the dock, in the reeds, on a lily pad, behind a rock, near the shore"),
        helpers=_words("frog duck swan beaver"),
    ),
    "school": dict(
        sights=_phrases("colorful desks, a big chalkboard, shelves of books, a fish tank, paintings on the wall"),
        spots=_phrases("under a desk, behind the bookshelf, in the toy box, near the window, by the door"),
        helpers=_words("hamster parrot mouse fish"),
    ),
    "house": dict(
        sights=_phrases("a cozy kitchen, a soft couch, a warm fireplace, a big window, a stairway"),
        spots=_phrases("under the bed, behind the couch, in the closet, under a pillow, in the toy chest"),
        helpers=_words("cat dog mouse puppy"),
    ),
    "mountain": dict(
        sights=_phrases("snowy peaks, a winding trail, big rocks, a cold stream, eagles flying high"),
        spots=_phrases("behind a rock, in a small cave, under the snow, near the trail, by a pine tree"),
        helpers=_words("goat eagle bear marmot"),
    ),
    "zoo": dict(
        sights=_phrases("tall giraffes, a sleepy lion, funny monkeys, a big elephant, a pond with seals"),
        spots=_phrases("by the monkey cage, near the seal pond, under a bench, behind the gift shop"),
        helpers=_words("monkey elephant penguin zebra"),
    ),
    "meadow": dict(
        sights=_phrases("wild flowers, soft grass, fluttering butterflies, a gentle hill, a lone tree"),
        spots=_phrases("in the tall flowers, behind the hill, under the lone tree, in a rabbit hole"),
        helpers=_words("rabbit butterfly mouse bee"),
    ),
    "library": dict(
        sights=_phrases("tall shelves, cozy reading chairs, a globe, picture books, a sleepy librarian"),
        spots=_phrases("behind the shelf, under a reading chair, between two books, near the globe"),
        helpers=_words("mouse owl cat parrot"),
    ),
    "river": dict(
        sights=_phrases("rushing water, smooth stones, a wooden bridge, fish jumping, willow trees"),
        spots=_phrases("under the bridge, between the stones, in the willow roots, near the rapids"),
        helpers=_words("otter beaver heron trout"),
    ),
    "castle": dict(
        sights=_phrases("high towers, a drawbridge, colorful flags, a throne room, a moat with lilies"),
        spots=_phrases("in the tower, behind the throne, under the drawbridge, near the moat"),
        helpers=_words("dragon knight horse raven"),
    ),
    "playground": dict(
        sights=_phrases("a sandbox, a climbing frame, a merry-go-round, monkey bars, a tire swing"),
        spots=_phrases("in the sandbox, under the monkey bars, behind the tire swing, near the gate"),
        helpers=_words("puppy pigeon squirrel kitten"),
    ),
    "jungle": dict(
        sights=_phrases("giant leaves, hanging vines, colorful parrots, a waterfall, huge flowers"),
        spots=_phrases("behind the waterfall, under a giant leaf, in the vines, near a hollow tree"),
        helpers=_words("monkey parrot toucan sloth"),
    ),
    "island": dict(
        sights=_phrases("palm trees, white sand, a lighthouse, coconuts, turtles on the shore"),
        spots=_phrases("under a palm tree, near the lighthouse, behind the rocks, in a sandy hole"),
        helpers=_words("turtle crab pelican dolphin"),
    ),
    "town": dict(
        sights=_phrases("a busy market, a bakery, a toy shop, a clock tower, a small library"),
        spots=_phrases("at the market, by the bakery, under a cart, near the clock tower, in the library"),
        helpers=_words("dog pigeon cat horse"),
    ),
}
