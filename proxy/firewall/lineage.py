"""Column lineage over pglast trees: which table columns each value of a statement comes from.

A statement is read the way PostgreSQL scopes it: FROM items (tables and views from the catalog,
CTEs, derived tables, joins, functions) make row sources; column references resolve to the
nearest source that has the column, outward through enclosing queries for correlated
subqueries. Every reference to a table is its own *instance*, so a self-join (`users a JOIN
users b`) and two references to one CTE are told apart.

While tracing, the analysis records *correlations*: predicates that match values of one row
source against another (`=`, `<`, LIKE, IN lists, IN/ANY/ALL subqueries, JOIN ... USING,
NATURAL JOIN, INTERSECT/EXCEPT, GROUP BY/DISTINCT ON/PARTITION BY a value merged from two row
sources), with the base columns on each side. Comparisons also chain:
every compared value is a node of an equivalence class (union-find), so `a.key = g AND g = b.key`
matches `a` against `b` through `g`. Values that come from no table but vary per row (a function in
FROM such as generate_series or unnest, a VALUES list, a CTE or subquery computing them) are
*derived columns* of their row source: they never make a correlation on their own (`ssn IN (VALUES
...)` filters), only by linking two table columns.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from pglast import ast
from pglast.enums import SetOperation, SubLinkType

from proxy.catalog import CatalogSnapshot
from proxy.firewall.tree import children, function_name, is_comparison, walk

Instance = tuple[int, ...]

# Aggregates that only count the rows where a column is not null: over a plain column they do not
# reveal its values. Every other aggregate or window function (sum, avg, percentiles, ranks over an
# ORDER BY ...) is the value itself over a group of one row, so it shows what it reads.
COUNTING_AGGREGATES = frozenset({"count", "regr_count"})


@dataclass(frozen=True, slots=True)
class BaseColumn:
    """A column of a catalog relation as read by one reference (`instance`) in the statement."""

    relation: str  # schema.name
    column: str
    instance: Instance

    @property
    def qualified(self) -> str:
        return f"{self.relation}.{self.column}"

    @property
    def derived(self) -> bool:
        """A column of a row source that reads no table (`(generate_series).g`), not a catalog column."""
        return self.relation.startswith("(")


@dataclass(frozen=True, slots=True)
class ColumnLineage:
    """One output column: every base column it is computed from, and those whose values it shows."""

    name: str
    sources: frozenset[BaseColumn] = frozenset()
    exposed: frozenset[BaseColumn] = frozenset()  # not hidden behind count/sum/avg/...


@dataclass(frozen=True, slots=True)
class Correlation:
    """A predicate that matches base columns of one row source against another."""

    how: str  # "comparison", "JOIN USING", "NATURAL JOIN", "IN subquery", "INTERSECT", "EXCEPT"
    left: BaseColumn
    right: BaseColumn


@dataclass(slots=True)
class _RowSource:
    names: frozenset[str]  # alias, or relation name (and schema.name)
    columns: list[ColumnLineage]
    known: bool = True  # False: a relation the catalog does not know

    def column(self, name: str) -> ColumnLineage | None:
        return next((column for column in self.columns if column.name == name), None)


@dataclass(slots=True)
class _Scope:
    sources: list[_RowSource] = field(default_factory=list)


_EMPTY = ColumnLineage("?column?")


class LineageAnalysis:
    """Traces one statement; `outputs` are the columns it returns, `correlations` what it matched.

    `sensitive(column)` selects which base columns make a correlation worth recording.
    """

    def __init__(self, catalog: CatalogSnapshot, search_path: Sequence[str], user: str | None,
                 sensitive: Callable[[BaseColumn], bool]) -> None:
        self.catalog = catalog
        self.search_path = search_path
        self.user = user
        self.sensitive = sensitive
        self.correlations: list[Correlation] = []
        self.outputs: list[ColumnLineage] = []
        self._sublinks: dict[int, list[ColumnLineage]] = {}
        self._compared: list[tuple[frozenset[BaseColumn], frozenset[BaseColumn]]] = []
        self._windows: dict[str, ast.WindowDef] = {}
        self._filtered: list[set[BaseColumn]] = []  # per query being read: columns its conditions read
        self._filters: dict[int, set[BaseColumn]] = {}  # id(SelectStmt) -> columns its conditions read
        self._reached: set[int] = set()  # id(_Scope) of scopes column references resolved in
        self._sublink_filters: dict[int, frozenset[BaseColumn]] = {}

    # --- statements ------------------------------------------------------------------------

    def statement(self, node: ast.Node) -> LineageAnalysis:
        """Analyse a statement; `outputs` is set for statements that return or store rows."""
        self._statement(node)
        self._chain_correlations()
        return self

    def _statement(self, node: ast.Node) -> None:
        if isinstance(node, ast.SelectStmt):
            self.outputs = self.select(node, [], {})
        elif isinstance(node, ast.InsertStmt | ast.UpdateStmt | ast.DeleteStmt | ast.MergeStmt):
            self.outputs = self._modification(node)
        elif isinstance(node, ast.ExplainStmt):  # returns a plan, not the rows
            if node.query is not None:
                self._statement(node.query)
            self.outputs = []
        elif isinstance(node, ast.CopyStmt | ast.DeclareCursorStmt | ast.CreateTableAsStmt | ast.PrepareStmt
                        | ast.ViewStmt):
            inner = getattr(node, "query", None)
            if isinstance(inner, ast.Node):
                self._statement(inner)
        else:
            for select in _top_selects(node):
                self.select(select, [], {})

    def _modification(self, node: ast.Node) -> list[ColumnLineage]:
        ctes: dict[str, list[ColumnLineage]] = {}
        with_clause = getattr(node, "withClause", None)
        if isinstance(with_clause, ast.WithClause):
            ctes = self._with(with_clause, [], ctes)
        scope = _Scope()
        target = getattr(node, "relation", None)
        if isinstance(target, ast.RangeVar):
            scope.sources.extend(self._from_item(target, scope, [], ctes))
        for name in ("fromClause", "usingClause"):
            for item in getattr(node, name, None) or ():
                scope.sources.extend(self._from_item(item, scope, [], ctes))
        if isinstance(node, ast.MergeStmt) and node.sourceRelation is not None:
            scope.sources.extend(self._from_item(node.sourceRelation, scope, [], ctes))
            self._check(node.joinCondition, [scope], ctes)
        if isinstance(node, ast.InsertStmt) and isinstance(node.selectStmt, ast.SelectStmt):
            self.select(node.selectStmt, [], ctes)
        for name in ("whereClause", "targetList", "mergeWhenClauses"):
            self._check(getattr(node, name, None), [scope], ctes)
        self._check_conditions(getattr(node, "whereClause", None), [scope], ctes)
        return self._targets(getattr(node, "returningList", None) or (), [scope], ctes)

    # --- queries ---------------------------------------------------------------------------

    def select(self, node: ast.SelectStmt, outer: list[_Scope],
               ctes: dict[str, list[ColumnLineage]]) -> list[ColumnLineage]:
        self._filtered.append(set())
        try:
            return self._select(node, outer, ctes)
        finally:
            filtered = self._filtered.pop()
            self._filters[id(node)] = filtered
            if self._filtered:
                self._filtered[-1] |= filtered

    def _select(self, node: ast.SelectStmt, outer: list[_Scope],
                ctes: dict[str, list[ColumnLineage]]) -> list[ColumnLineage]:
        if node.withClause is not None:
            ctes = self._with(node.withClause, outer, ctes)
        if node.op != SetOperation.SETOP_NONE and node.larg is not None and node.rarg is not None:
            left = self.select(node.larg, outer, ctes)
            right = self.select(node.rarg, outer, ctes)
            if node.op in (SetOperation.SETOP_INTERSECT, SetOperation.SETOP_EXCEPT):
                how = "INTERSECT" if node.op == SetOperation.SETOP_INTERSECT else "EXCEPT"
                for mine, theirs in zip(left, right, strict=False):
                    self._correlate(mine.sources, theirs.sources, how, any_instance=True)
            return [ColumnLineage(mine.name, mine.sources | theirs.sources, mine.exposed | theirs.exposed)
                    for mine, theirs in zip(left, right, strict=False)]
        scope = _Scope()
        chain = [scope, *outer]
        if node.valuesLists:
            rows = [list(row) for row in node.valuesLists]
            width = max(len(row) for row in rows)
            return [self._lineage_column(f"column{index + 1}",
                                         [row[index] for row in rows if index < len(row)], chain, ctes)
                    for index in range(width)]
        for item in node.fromClause or ():
            scope.sources.extend(self._from_item(item, scope, outer, ctes))
        for clause in (node.whereClause, node.havingClause, node.groupClause, node.sortClause,
                       node.windowClause, node.distinctClause, node.targetList):
            self._check(clause, chain, ctes)
        for condition in (node.whereClause, node.havingClause):
            self._check_conditions(condition, chain, ctes)
        self._check_grouping(node, chain, ctes)
        enclosing = self._windows
        self._windows = {str(window.name): window for window in node.windowClause or ()
                         if isinstance(window, ast.WindowDef) and window.name}
        try:
            return self._targets(node.targetList or (), chain, ctes)
        finally:
            self._windows = enclosing

    def _with(self, clause: ast.WithClause, outer: list[_Scope],
              ctes: dict[str, list[ColumnLineage]]) -> dict[str, list[ColumnLineage]]:
        ctes = dict(ctes)
        for cte in clause.ctes or ():
            if not isinstance(cte, ast.CommonTableExpr) or not isinstance(cte.ctequery, ast.Node):
                continue
            name = str(cte.ctename)
            query = cte.ctequery
            if (clause.recursive and isinstance(query, ast.SelectStmt) and query.larg is not None
                    and query.op == SetOperation.SETOP_UNION):
                ctes[name] = _renamed(self.select(query.larg, outer, ctes), _strings(cte.aliascolnames))
            if isinstance(query, ast.SelectStmt):
                columns = _derived(_renamed(self.select(query, outer, ctes), _strings(cte.aliascolnames)),
                                   name, (id(cte),), query)
            else:
                columns = _renamed(self._modification(query), _strings(cte.aliascolnames))
            ctes[name] = columns
        return ctes

    def _targets(self, targets: Iterable[ast.Node], chain: list[_Scope],
                 ctes: dict[str, list[ColumnLineage]]) -> list[ColumnLineage]:
        columns: list[ColumnLineage] = []
        for target in targets:
            if not isinstance(target, ast.ResTarget) or target.val is None:
                continue
            value = target.val
            if isinstance(value, ast.ColumnRef) and value.fields and isinstance(value.fields[-1], ast.A_Star):
                columns.extend(self._resolve(value, chain))
                continue
            columns.append(self._lineage_column(target.name or _output_name(value), [value], chain, ctes))
        return columns

    def _lineage_column(self, name: str, expressions: list[ast.Node], chain: list[_Scope],
                        ctes: dict[str, list[ColumnLineage]]) -> ColumnLineage:
        sources: set[BaseColumn] = set()
        exposed: set[BaseColumn] = set()
        for expression in expressions:
            found_sources, found_exposed = self._expression(expression, chain, ctes)
            sources |= found_sources
            exposed |= found_exposed
        return ColumnLineage(name, frozenset(sources), frozenset(exposed))

    # --- FROM items ------------------------------------------------------------------------

    def _from_item(self, item: ast.Node, scope: _Scope, outer: list[_Scope],
                   ctes: dict[str, list[ColumnLineage]]) -> list[_RowSource]:
        if isinstance(item, ast.RangeVar):
            return [self._relation(item, ctes)]
        if isinstance(item, ast.RangeSubselect) and isinstance(item.subquery, ast.SelectStmt):
            visible = [scope, *outer] if item.lateral else outer
            columns = _renamed(self.select(item.subquery, visible, ctes), _alias_columns(item.alias))
            label = str(item.alias.aliasname) if item.alias is not None else "subquery"
            columns = _derived(columns, label, (id(item),), item.subquery)
            return [_RowSource(_alias_names(item.alias), columns)]
        if isinstance(item, ast.JoinExpr):
            left = self._from_item(item.larg, scope, outer, ctes) if item.larg is not None else []
            scope.sources.extend(left)
            right = self._from_item(item.rarg, scope, outer, ctes) if item.rarg is not None else []
            del scope.sources[len(scope.sources) - len(left):]
            for name in _strings(item.usingClause):
                self._match_named(left, right, name, "JOIN USING")
            if item.isNatural:
                left_names = {column.name for source in left for column in source.columns}
                right_names = {column.name for source in right for column in source.columns}
                for name in sorted(left_names & right_names):
                    self._match_named(left, right, name, "NATURAL JOIN")
            visible = [_Scope([*scope.sources, *left, *right]), *outer]
            self._check(item.quals, visible, ctes)
            self._check_conditions(item.quals, visible, ctes)
            if item.alias is not None:
                merged = [column for source in left + right for column in source.columns]
                return [_RowSource(_alias_names(item.alias), _renamed(merged, _alias_columns(item.alias)))]
            return left + right
        if isinstance(item, ast.RangeFunction):
            return [self._function_source(item, [scope, *outer], ctes)]
        if isinstance(item, ast.RangeTableSample) and isinstance(item.relation, ast.RangeVar):
            return [self._relation(item.relation, ctes)]
        return [_RowSource(frozenset(), [], known=False)]

    def _relation(self, node: ast.RangeVar, ctes: dict[str, list[ColumnLineage]]) -> _RowSource:
        relname = str(node.relname)
        names = set(_alias_names(node.alias)) if node.alias is not None else {relname}
        instance = (id(node),)
        if node.schemaname is None and relname in ctes:
            columns = [_reinstanced(column, instance) for column in ctes[relname]]
            return _RowSource(frozenset(names), _renamed(columns, _alias_columns(node.alias)))
        parts = tuple(str(part) for part in (node.catalogname, node.schemaname, node.relname) if part)
        relation = self.catalog.resolve(parts, self.search_path, self.user)
        if relation is None:
            return _RowSource(frozenset(names), [], known=False)
        if node.alias is None:
            names.add(relation.qualified_name)
        base = []
        for column in relation.columns:
            read = frozenset({BaseColumn(relation.qualified_name, column.name, instance)})
            base.append(ColumnLineage(column.name, read, read))
        return _RowSource(frozenset(names), _renamed(base, _alias_columns(node.alias)))

    def _function_source(self, item: ast.RangeFunction, chain: list[_Scope],
                         ctes: dict[str, list[ColumnLineage]]) -> _RowSource:
        calls = [part for function in item.functions or () for part in function if isinstance(part, ast.Node)]
        value = self._lineage_column("", calls, chain, ctes)
        names = list(_alias_columns(item.alias))
        if not names:
            names = [str(item.alias.aliasname)] if item.alias is not None else [
                function_name(call) for call in calls if isinstance(call, ast.FuncCall)]
        for definition in item.coldeflist or ():
            if isinstance(definition, ast.ColumnDef) and definition.colname:
                names.append(str(definition.colname))
        columns = [ColumnLineage(name, value.sources, value.exposed) for name in names or ["?column?"]]
        label = ", ".join(function_name(call) for call in calls if isinstance(call, ast.FuncCall))
        label = label or "function"
        return _RowSource(_alias_names(item.alias), _derived(columns, label, (id(item),)))

    # --- expressions -----------------------------------------------------------------------

    def _resolve(self, ref: ast.ColumnRef, chain: list[_Scope]) -> list[ColumnLineage]:
        fields = list(ref.fields or ())
        names = [str(part.sval) for part in fields if isinstance(part, ast.String)]
        star = bool(fields) and isinstance(fields[-1], ast.A_Star)
        for scope in chain:
            if star and not names:
                self._reached.add(id(scope))
                return [column for source in scope.sources for column in source.columns]
            qualifier = ".".join(names[-3:-1]) if not star else ".".join(names[-2:])
            column_name = names[-1] if names and not star else ""
            for source in scope.sources:
                if qualifier and not (qualifier in source.names or qualifier.split(".")[-1] in source.names):
                    continue
                if star:
                    self._reached.add(id(scope))
                    return list(source.columns)
                column = source.column(column_name)
                if column is not None:
                    self._reached.add(id(scope))
                    return [column]
                if qualifier and source.known:
                    return []
            if not qualifier and not star:
                whole_row = next((source for source in scope.sources if column_name in source.names), None)
                if whole_row is not None:
                    self._reached.add(id(scope))
                    return [_merged(column_name, whole_row.columns)]
        return []

    def _expression(self, node: ast.Node | None, chain: list[_Scope], ctes: dict[str, list[ColumnLineage]],
                    ) -> tuple[set[BaseColumn], set[BaseColumn]]:
        sources: set[BaseColumn] = set()
        exposed: set[BaseColumn] = set()
        if node is None:
            return sources, exposed
        if isinstance(node, ast.ColumnRef):
            for column in self._resolve(node, chain):
                sources |= column.sources
                exposed |= column.exposed
            return sources, exposed
        if isinstance(node, ast.SubLink):
            if node.testexpr is not None:
                found = self._expression(node.testexpr, chain, ctes)
                sources |= found[0]
            columns = self._sublink(node, chain, ctes)
            if node.subLinkType in (SubLinkType.EXPR_SUBLINK, SubLinkType.ARRAY_SUBLINK) and columns:
                sources |= columns[0].sources
                exposed |= columns[0].exposed
            else:
                sources |= {base for column in columns for base in column.sources}
            exposed |= self._sublink_filters.get(id(node), frozenset())
            return sources, exposed
        if isinstance(node, ast.FuncCall):
            counting = function_name(node) in COUNTING_AGGREGATES
            for argument in node.args or ():
                found_sources, found_exposed = self._expression(argument, chain, ctes)
                sources |= found_sources
                if not (counting and _plain_column(argument)):  # count(CASE WHEN zip = ...) shows zip
                    exposed |= found_exposed
            # WITHIN GROUP (ORDER BY x), FILTER (WHERE x = ...) and a window's ORDER BY (ranks,
            # running sums) are values derived from x; PARTITION BY only groups, like GROUP BY.
            shown: list[object] = [node.agg_order, node.agg_filter]
            grouped: list[object] = []
            if node.over is not None:
                window = self._window(node.over)
                shown.append([definition.orderClause for definition in window])
                grouped.append([(definition.partitionClause, definition.startOffset, definition.endOffset)
                                for definition in window])
            for part in shown:
                found_sources, found_exposed = self._expression_list(_flat(part), chain, ctes)
                sources |= found_sources
                exposed |= found_exposed
            for part in grouped:
                sources |= self._expression_list(_flat(part), chain, ctes)[0]
            return sources, exposed
        return self._expression_list(list(children(node)), chain, ctes)

    def _window(self, window: ast.WindowDef) -> list[ast.WindowDef]:
        """A window and the named windows it builds on (`OVER w`, `OVER (w ORDER BY x)`)."""
        found = [window]
        name = window.refname or (window.name if not (window.partitionClause or window.orderClause) else None)
        while name and (named := self._windows.get(str(name))) is not None and named not in found:
            found.append(named)
            name = named.refname
        return found

    def _expression_list(self, nodes: object, chain: list[_Scope],
                         ctes: dict[str, list[ColumnLineage]]) -> tuple[set[BaseColumn], set[BaseColumn]]:
        sources: set[BaseColumn] = set()
        exposed: set[BaseColumn] = set()
        items = nodes if isinstance(nodes, list | tuple) else [nodes]
        for item in items:
            if isinstance(item, ast.Node):
                found_sources, found_exposed = self._expression(item, chain, ctes)
                sources |= found_sources
                exposed |= found_exposed
        return sources, exposed

    def _sublink(self, node: ast.SubLink, chain: list[_Scope],
                 ctes: dict[str, list[ColumnLineage]]) -> list[ColumnLineage]:
        known = self._sublinks.get(id(node))
        if known is None:
            subquery = node.subselect
            reached, self._reached = self._reached, set()
            known = self.select(subquery, chain, ctes) if isinstance(subquery, ast.SelectStmt) else []
            self._sublinks[id(node)] = known
            # A subquery that reads the outer row is evaluated per row: its conditions decide its value
            # (`(SELECT count(*) FROM t x WHERE x.id = u.id AND x.zip = '10115')`).
            if any(id(scope) in self._reached for scope in chain):
                self._sublink_filters[id(node)] = frozenset(self._filters.get(id(subquery), ()))
            self._reached |= reached
        return known

    # --- correlations ----------------------------------------------------------------------

    def _check(self, clause: object, chain: list[_Scope], ctes: dict[str, list[ColumnLineage]]) -> None:
        """Record correlations in a clause of this query level; subqueries are analysed on the way."""
        stack = [item for item in (clause if isinstance(clause, list | tuple) else [clause])
                 if isinstance(item, ast.Node)]
        while stack:
            node = stack.pop()
            if isinstance(node, ast.SubLink):
                columns = self._sublink(node, chain, ctes)
                if node.testexpr is not None:
                    left, _ = self._expression(node.testexpr, chain, ctes)
                    right = {base for column in columns for base in column.sources}
                    self._correlate(left, right, "IN subquery")
                    self._compare(left, right)
                    items = _row_items(node.testexpr)
                    if len(items) > 1 and len(items) == len(columns):
                        for item, column in zip(items, columns, strict=True):
                            self._compare(self._expression(item, chain, ctes)[0], column.sources)
                    stack.append(node.testexpr)
                continue
            if isinstance(node, ast.WindowDef):
                for item in _flat(node.partitionClause):
                    sources, _ = self._expression(item, chain, ctes)
                    self._correlate(sources, sources, "PARTITION BY")
            if isinstance(node, ast.A_Expr) and is_comparison(node):
                left, _ = self._expression(node.lexpr, chain, ctes)
                right, _ = self._expression_list(node.rexpr, chain, ctes)
                self._correlate(left, right, "comparison")
                self._compare(left, right)
                mine, theirs = _row_items(node.lexpr), _row_items(node.rexpr)
                if len(mine) > 1 and len(mine) == len(theirs):
                    for one, other in zip(mine, theirs, strict=True):
                        self._compare(self._expression(one, chain, ctes)[0],
                                      self._expression(other, chain, ctes)[0])
            stack.extend(children(node))

    def _check_grouping(self, node: ast.SelectStmt, chain: list[_Scope],
                        ctes: dict[str, list[ColumnLineage]]) -> None:
        """GROUP BY or DISTINCT ON a value that merges a sensitive column with another row source's
        columns (a UNION of two tables' keys) puts matching rows in one group: that matches them."""
        targets = [target for target in node.targetList or () if isinstance(target, ast.ResTarget)]
        stack = _flat([node.groupClause, node.distinctClause])
        while stack:
            item = stack.pop()
            if isinstance(item, ast.GroupingSet | ast.RowExpr):
                stack.extend(children(item))
                continue
            sources: set[BaseColumn] = set()
            for value in (item, *_output_references(item, targets)):
                sources |= self._expression(value, chain, ctes)[0]
            self._correlate(sources, sources, "GROUP BY")

    def _check_conditions(self, clause: ast.Node | None, chain: list[_Scope],
                          ctes: dict[str, list[ColumnLineage]]) -> None:
        """Each AND/OR/NOT leaf of a WHERE, HAVING or ON clause that mixes a sensitive column with
        another row source's columns matches rows on it, whatever function it goes through
        (`strpos(b.x, a.ssn) > 0`, `starts_with(a.ssn, b.prefix)`)."""
        if clause is None:
            return
        if isinstance(clause, ast.BoolExpr):
            for operand in clause.args or ():
                self._check_conditions(operand, chain, ctes)
            return
        if isinstance(clause, ast.SubLink):
            if clause.testexpr is not None and self._filtered:
                self._filtered[-1] |= self._expression(clause.testexpr, chain, ctes)[0]
            return  # subqueries are checked on their own (IN/ANY/EXISTS)
        sources, _ = self._expression(clause, chain, ctes)
        if self._filtered:
            self._filtered[-1] |= sources
        self._correlate(sources, sources, "condition")

    def _match_named(self, left: list[_RowSource], right: list[_RowSource], name: str, how: str) -> None:
        mine = next((column for source in left if (column := source.column(name)) is not None), None)
        theirs = next((column for source in right if (column := source.column(name)) is not None), None)
        if mine is not None and theirs is not None:
            self._correlate(mine.sources, theirs.sources, how)
            self._compare(mine.sources, theirs.sources)

    def _correlate(self, left: Iterable[BaseColumn], right: Iterable[BaseColumn], how: str,
                   any_instance: bool = False) -> None:
        others = [theirs for theirs in right if not theirs.derived]
        for mine in left:
            if mine.derived:
                continue
            for theirs in others:
                if (mine.instance != theirs.instance or any_instance) and (
                        self.sensitive(mine) or self.sensitive(theirs)):
                    self.correlations.append(Correlation(how, mine, theirs))
                    return

    def _compare(self, left: Iterable[BaseColumn], right: Iterable[BaseColumn]) -> None:
        """Remember that two values were compared: they join one equivalence class. A value computed
        from derived columns (`g || h`) stays linked to each of them, so `g || h = a.ssn AND g = b.ssn`
        chains too (table columns are not split that way: `coalesce(ssn, tax_id) = $1` does not make
        tax_id the ssn)."""
        mine, theirs = frozenset(left), frozenset(right)
        if mine and theirs:
            self._compared.append((mine, theirs))
            for value in (mine, theirs):
                if len(value) > 1:
                    self._compared.extend((value, frozenset({base})) for base in value if base.derived)

    def _chain_correlations(self) -> None:
        """Comparisons chain: `a.key = g AND g = b.key` matches `a.key` against `b.key`. Every compared
        value (the set of columns it reads) is a node; a class of nodes linked by comparisons that holds
        a sensitive table column and a table column of another row source is a correlation."""
        compared, self._compared = self._compared, []
        if self.correlations or not compared:
            return
        parent: dict[frozenset[BaseColumn], frozenset[BaseColumn]] = {}

        def root(node: frozenset[BaseColumn]) -> frozenset[BaseColumn]:
            parent.setdefault(node, node)
            while parent[node] != node:
                parent[node] = parent[parent[node]]
                node = parent[node]
            return node

        for left, right in compared:
            parent[root(left)] = root(right)
        classes: dict[frozenset[BaseColumn], set[BaseColumn]] = {}
        for node in parent:
            classes.setdefault(root(node), set()).update(node)
        for members in classes.values():
            tables = sorted((base for base in members if not base.derived),
                            key=lambda base: (base.qualified, base.instance))
            for sensitive in (base for base in tables if self.sensitive(base)):
                other = next((base for base in tables if base.instance != sensitive.instance), None)
                if other is None:
                    continue
                hubs = sorted(base.qualified for base in members if base.derived)
                how = f"comparisons chained through {hubs[0]}" if hubs else "chained comparisons"
                self.correlations.append(Correlation(how, sensitive, other))
                return


def _top_selects(node: ast.Node) -> list[ast.SelectStmt]:
    found: list[ast.SelectStmt] = []
    stack = [node]
    while stack:
        current = stack.pop()
        if isinstance(current, ast.SelectStmt):
            found.append(current)
            continue
        stack.extend(children(current))
    return found


def _strings(values: object) -> list[str]:
    return [str(value.sval) for value in values or () if isinstance(value, ast.String)] \
        if isinstance(values, list | tuple) else []


def _alias_names(alias: ast.Alias | None) -> frozenset[str]:
    return frozenset({str(alias.aliasname)}) if alias is not None and alias.aliasname else frozenset()


def _alias_columns(alias: ast.Alias | None) -> list[str]:
    return _strings(alias.colnames) if alias is not None else []


def _renamed(columns: list[ColumnLineage], names: Sequence[str]) -> list[ColumnLineage]:
    return [ColumnLineage(names[index], column.sources, column.exposed) if index < len(names) else column
            for index, column in enumerate(columns)]


def _reinstanced(column: ColumnLineage, prefix: Instance) -> ColumnLineage:
    def again(bases: frozenset[BaseColumn]) -> frozenset[BaseColumn]:
        return frozenset(BaseColumn(base.relation, base.column, prefix + base.instance) for base in bases)
    return ColumnLineage(column.name, again(column.sources), again(column.exposed))


def _merged(name: str, columns: list[ColumnLineage]) -> ColumnLineage:
    return ColumnLineage(name, frozenset().union(*(c.sources for c in columns)),
                         frozenset().union(*(c.exposed for c in columns)))


def _derived(columns: list[ColumnLineage], label: str, instance: Instance,
             query: ast.SelectStmt | None = None) -> list[ColumnLineage]:
    """Columns of a row source that read no table become its derived columns (`(label).name`), so
    comparisons can chain through them; one row of constants stays constants (like `$1`)."""
    if query is not None and _one_row_of_constants(query):
        return columns
    return [column if column.sources else ColumnLineage(
                column.name, frozenset({BaseColumn(f"({label})", column.name, instance)}), column.exposed)
            for column in columns]


def _one_row_of_constants(query: ast.SelectStmt) -> bool:
    """`SELECT $1::date AS since`, `VALUES (1, 'x')`: no FROM, one row, no function that may return a set."""
    if query.op != SetOperation.SETOP_NONE or query.fromClause:
        return False
    rows = query.valuesLists or ()
    if len(rows) > 1:
        return False
    parts = [node for row in rows for node in row] + list(query.targetList or ())
    return not any(isinstance(found, ast.FuncCall | ast.SubLink) for part in parts for found in walk(part))


def _output_references(item: ast.Node, targets: list[ast.ResTarget]) -> list[ast.Node]:
    """Select-list items a GROUP BY item may name: `GROUP BY 1`, `GROUP BY alias`."""
    if isinstance(item, ast.A_Const) and isinstance(item.val, ast.Integer):
        index = (item.val.ival or 0) - 1
        value = targets[index].val if 0 <= index < len(targets) else None
        return [value] if isinstance(value, ast.Node) else []
    fields = item.fields or () if isinstance(item, ast.ColumnRef) else ()
    if len(fields) == 1 and isinstance(fields[0], ast.String):
        name = str(fields[0].sval)
        return [target.val for target in targets if target.name == name and isinstance(target.val, ast.Node)]
    return []


def _plain_column(node: ast.Node) -> bool:
    """`zip`, `u.zip`, `zip::text`: what count(...) of it shows is only whether it is null."""
    while isinstance(node, ast.TypeCast) and node.arg is not None:
        node = node.arg
    return isinstance(node, ast.ColumnRef)


def _flat(value: object) -> list[ast.Node]:
    """Nodes in a value that may be a node, None, or nested lists/tuples of them."""
    if isinstance(value, ast.Node):
        return [value]
    if isinstance(value, list | tuple):
        return [node for item in value for node in _flat(item)]
    return []


def _row_items(node: object) -> list[ast.Node]:
    """The fields of a row constructor `(a, b)`, else the value itself (nothing for an IN list)."""
    if isinstance(node, ast.RowExpr):
        return [item for item in node.args or () if isinstance(item, ast.Node)]
    return [node] if isinstance(node, ast.Node) else []


def _output_name(value: ast.Node) -> str:
    """The column name PostgreSQL gives an unnamed select-list item."""
    if isinstance(value, ast.ColumnRef) and value.fields and isinstance(value.fields[-1], ast.String):
        return str(value.fields[-1].sval)
    if isinstance(value, ast.FuncCall):
        return function_name(value)
    if isinstance(value, ast.TypeCast) and value.arg is not None:
        return _output_name(value.arg)
    return _EMPTY.name
