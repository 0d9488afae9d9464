"""report.html read back as data: its tables, images, folded-away text and section order."""

from html.parser import HTMLParser


class Page(HTMLParser):
    """Tables by class (rows of cell texts), every img src, the text inside <details>, and the order of
    h2 ids and tables."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[str] = []
        self.order: list[str] = []
        self.details = ""
        self.bold_cells: list[str] = []
        self._table = self._row = self._cell = None
        self._depth_in_details = 0
        self._cell_bold = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "details":
            self._depth_in_details += 1
        elif tag == "h2":
            self.order.append(f"h2:{attrs.get('id')}")
        elif tag == "table":
            self.order.append(f"table:{attrs.get('class', '')}")
            self._table = self.tables.setdefault(attrs.get("class", ""), [])
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = ""
            self._cell_bold = "detail" in (attrs.get("class") or "")
        elif tag == "img":
            self.images.append(attrs["src"])

    def handle_endtag(self, tag):
        if tag == "details":
            self._depth_in_details -= 1
        elif tag in ("td", "th") and self._cell is not None:
            self._row.append(self._cell.strip())
            if self._cell_bold:
                self.bold_cells.append(self._cell.strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self._table.append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data
        if self._depth_in_details:
            self.details += data


def parse(path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page
